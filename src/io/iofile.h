/* Private helpers of src/io for text files and JSON fields (not part of the public API):
 * whole-file reads with a size cap, atomic writes, path joins, and typed JSON field getters
 * whose messages name the file and the key. Used by hf_config.c, peft_adapter.c,
 * adapter_writer.c, token_set.c and inspect.c. */
#ifndef ITERIS_IO_IOFILE_H
#define ITERIS_IO_IOFILE_H

#include <stddef.h>

#include <cjson/cJSON.h>

#include "iteris/core.h"

/* Largest JSON config file accepted (config.json, adapter_config.json). */
#define ITR_IOFILE_JSON_CAP ((size_t)16 << 20)

/* *out = the whole file, NUL-terminated (itr_calloc'd; caller frees), *len its length.
 * ITR_ERR_INPUT naming the file when it cannot be opened or exceeds cap bytes. */
itr_err itr_iofile_read(const char *path, size_t cap, char **out, size_t *len);
/* Writes len bytes to path atomically: path.tmp.<pid>, fsync, rename. */
itr_err itr_iofile_write_atomic(const char *path, const void *data, size_t len);
/* 1 when path names an existing directory / regular file. */
int itr_iofile_is_dir(const char *path);
int itr_iofile_is_file(const char *path);
/* buf = dir + "/" + name; ITR_ERR_INPUT when it does not fit in len bytes. */
itr_err itr_iofile_join(char *buf, size_t len, const char *dir, const char *name);
/* mkdir -p (mode 0755); ITR_ERR_INPUT naming the folder on failure. */
itr_err itr_iofile_mkdirs(const char *dir);

/* Parses a JSON object held in text (file names the source for messages). On failure the
 * message gives the file, the line and column of the first error, and a snippet. */
itr_err itr_json_parse_object(const char *text, size_t len, const char *file, cJSON **out);
/* Reads file (at most ITR_IOFILE_JSON_CAP bytes) and parses it as one JSON object (as above). */
itr_err itr_json_read_object(const char *file, cJSON **out);

/* The JSON object name in the folder that holds file (e.g. the tokenizer_config.json beside a
 * tokenizer file): path = its path (len bytes), *out = the object, or NULL when there is no such file. */
itr_err itr_json_read_beside(const char *file, const char *name, char *path, size_t len, cJSON **out);

/* Typed getters. A field that is absent (or null, when null_is_absent) takes the default when
 * required is 0; otherwise absent is an error. Messages: "FILE: 'key' must be ..., got ...". */
itr_err itr_json_int(const cJSON *obj, const char *key, const char *file, int required, int def,
                     long lo, long hi, int *out);
itr_err itr_json_double(const cJSON *obj, const char *key, const char *file, int required,
                        double def, double *out);
itr_err itr_json_bool(const cJSON *obj, const char *key, const char *file, int def, int *out);
/* *out = the string value (owned by obj) or def when absent/null. */
itr_err itr_json_string(const cJSON *obj, const char *key, const char *file, const char *def,
                        const char **out);
/* A short rendering of a JSON value for messages ("true", "12", "'llama3'", "{...}"). */
void itr_json_describe(const cJSON *v, char *buf, size_t len);

#endif
