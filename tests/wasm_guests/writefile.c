/* Writes argv[2] into the file argv[1]; prints "wrote" or why it cannot (exit 1). */
#include <errno.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc < 3)
        return 2;
    FILE *f = fopen(argv[1], "w");
    if (!f || fputs(argv[2], f) < 0 || fclose(f) != 0) {
        printf("%s: error: %s\n", argv[1], strerror(errno));
        return 1;
    }
    printf("wrote %s\n", argv[1]);
    return 0;
}
