/* Makes the directory argv[1]; prints "made" or why it cannot (exit 1). */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    if (mkdir(argv[1], 0755) != 0) {
        printf("%s: error: %s\n", argv[1], strerror(errno));
        return 1;
    }
    printf("made %s\n", argv[1]);
    return 0;
}
