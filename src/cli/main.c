#include <stdio.h>
#include "iteris/core.h"
int main(void) { printf("iteris-mpi\n"); return 0; }
