/* Computes forever: no WASI call after the first line. */
#include <stdio.h>

int main(void) {
    printf("spinning\n");
    fflush(stdout);
    volatile unsigned long n = 0;
    for (;;)
        n++;
}
