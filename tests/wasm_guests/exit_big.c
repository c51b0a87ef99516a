/* exit()s with argv[1] (default 200): codes WASI preview 1 cannot report by itself. */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    printf("exiting\n");
    exit(argc > 1 ? atoi(argv[1]) : 200);
}
