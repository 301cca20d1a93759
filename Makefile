# iteris-mpi build. `make deps` installs the Debian packages, `make` builds the library and the
# binary, `make test` builds and runs every test and ends with "N passed, N failed".
# Variables: BUILD (output folder, default build), WERROR=1 (warnings are errors; CI sets it),
# SAN=1 (AddressSanitizer + UndefinedBehaviorSanitizer build), OPT (optimisation flags),
# FUZZ_SECONDS (how long `make fuzz` runs each libFuzzer target; default 60).

BUILD  ?= build
OPT    ?= -O2 -g
WERROR ?= 0
SAN    ?= 0
PKGS   := petsc hdf5-openmpi scalapack-openmpi lapacke openblas libcjson libpcre2-8 icu-uc

CC  := mpicc
CXX := mpicxx
# V=1 prints every command; by default one short line per file
V ?= 0
ifeq ($(V),1)
Q :=
else
Q := @
endif
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lgfortran -lm

WARN := -Wall -Wextra
ifeq ($(WERROR),1)
WARN += -Werror
endif
SANFLAGS :=
ifeq ($(SAN),1)
SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
endif
# FUZZ=1 (set by `make fuzz` for its own BUILD folder): clang through mpicc, libFuzzer's coverage
# instrumentation with ASan/UBSan
FUZZ ?= 0
ifeq ($(FUZZ),1)
export OMPI_CC := clang
SANFLAGS := -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
endif

CPPFLAGS := -Iinclude -Isrc $(PKG_CFLAGS) -D_POSIX_C_SOURCE=200809L -DOMPI_SKIP_MPICXX=1
CFLAGS   := -std=c11 $(OPT) $(WARN) $(SANFLAGS) -fPIC
CXXFLAGS := -std=c++17 $(OPT) $(WARN) $(SANFLAGS) $(shell pkg-config --cflags gtest)
LDFLAGS  := $(SANFLAGS)

LAYERS   := core io model dist merge eval synth pipeline train
LIB_SRC  := $(foreach l,$(LAYERS),$(wildcard src/$(l)/*.c))
CLI_SRC  := $(wildcard src/cli/*.c)
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
CLI_OBJ  := $(CLI_SRC:%.c=$(BUILD)/obj/%.o)
LIB      := $(BUILD)/lib/libiteris.a
BIN      := $(BUILD)/bin/iteris-mpi

UNIT_SRC := $(wildcard tests/unit/*.cc) tests/common/unit_main.cc
MPI_SRC  := $(wildcard tests/mpi/*.cc) tests/common/mpi_main.cc
BENCH_SRC := $(wildcard bench/*.c)
UNIT_OBJ := $(UNIT_SRC:%.cc=$(BUILD)/obj/%.o)
MPI_OBJ  := $(MPI_SRC:%.cc=$(BUILD)/obj/%.o)
UNIT_BIN := $(BUILD)/tests/unit_tests
MPI_BIN  := $(BUILD)/tests/mpi_tests
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)
FUZZ_SRC := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_BIN := $(FUZZ_SRC:tests/fuzz/%.c=$(BUILD)/fuzz/%)
FUZZ_CLI := $(BUILD)/obj/src/cli/options.o $(BUILD)/obj/src/cli/job_file.o
FUZZ_SECONDS ?= 60

.PHONY: all deps test test-unit test-mpi test-e2e test-asan test-slurm fuzz fuzz-bins bench demo clean format help
all: $(BIN)

help:
	@sed -n '1,4p' Makefile | sed 's/^# //'

deps:
	bash scripts/install-deps.sh --python

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC    $<")
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/obj/%.o: %.cc
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CXX   $<")
	$(Q)$(CXX) $(CPPFLAGS) $(CXXFLAGS) -MMD -MP -c $< -o $@

$(LIB): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  AR    $@")
	$(Q)rm -f $@ && ar rcs $@ $^

$(BIN): $(CLI_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD    $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $(CLI_OBJ) $(LIB) $(PKG_LIBS)

$(UNIT_BIN): $(UNIT_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD    $@")
	$(Q)$(CXX) $(LDFLAGS) -o $@ $(UNIT_OBJ) $(LIB) $(PKG_LIBS) $(shell pkg-config --libs gtest)

$(MPI_BIN): $(MPI_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD    $@")
	$(Q)$(CXX) $(LDFLAGS) -o $@ $(MPI_OBJ) $(LIB) $(PKG_LIBS) $(shell pkg-config --libs gtest)

$(BUILD)/bench/%: bench/%.c $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(LIB) $(PKG_LIBS)

tests: $(BIN) $(UNIT_BIN) $(MPI_BIN)

$(BUILD)/fuzz/%: tests/fuzz/%.c tests/fuzz/fuzz_common.h $(LIB) $(FUZZ_CLI)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  LD    $@")
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) -fsanitize=fuzzer -o $@ $< $(FUZZ_CLI) $(LIB) $(PKG_LIBS)

fuzz-bins: $(FUZZ_BIN)

# Everything: unit tests, the same unit tests under ASan/UBSan, MPI tests at -np 1..4, end-to-end runs, and
# some end-to-end runs again with the binary built with ASan/UBSan.
test: tests
	$(MAKE) --no-print-directory BUILD=$(BUILD)/asan SAN=1 OPT="-O1 -g" $(BUILD)/asan/tests/unit_tests $(BUILD)/asan/bin/iteris-mpi
	BUILD=$(BUILD) bash tests/run.sh

test-unit: $(UNIT_BIN)
	ONLY=unit BUILD=$(BUILD) bash tests/run.sh

test-asan:
	$(MAKE) --no-print-directory BUILD=$(BUILD)/asan SAN=1 OPT="-O1 -g" $(BUILD)/asan/tests/unit_tests $(BUILD)/asan/bin/iteris-mpi
	ONLY="asan e2e-san" BUILD=$(BUILD) bash tests/run.sh

test-mpi: $(MPI_BIN)
	ONLY=mpi BUILD=$(BUILD) bash tests/run.sh

test-e2e: $(BIN)
	ONLY=e2e BUILD=$(BUILD) bash tests/run.sh

test-slurm: $(BIN)
	BUILD=$(BUILD) bash tests/slurm/run.sh

# libFuzzer targets (tests/fuzz/) built with clang in BUILD/fuzz, each run over its seed corpus and
# then for FUZZ_SECONDS; ends with "N passed, N failed"
fuzz:
	$(MAKE) --no-print-directory BUILD=$(BUILD)/fuzz FUZZ=1 OPT="-O1 -g" fuzz-bins
	BUILD=$(BUILD)/fuzz FUZZ_SECONDS=$(FUZZ_SECONDS) bash tests/fuzz/run.sh

bench: $(BIN) $(BENCH_BIN)
	BUILD=$(BUILD) bash bench/run.sh

demo: $(BIN)
	bash scripts/demo.sh

format:
	clang-format -i $(LIB_SRC) $(CLI_SRC) $(wildcard include/iteris/*.h src/*/*.h tests/*/*.cc)

clean:
	rm -rf $(BUILD)

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d) $(UNIT_OBJ:.o=.d) $(MPI_OBJ:.o=.d)
