/* Prints the first line of each file named on the command line, or why it cannot. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "r");
        if (!f) {
            printf("%s: error: %s\n", argv[i], strerror(errno));
            continue;
        }
        char line[256] = {0};
        if (!fgets(line, sizeof line, f))
            line[0] = 0;
        line[strcspn(line, "\n")] = 0;
        printf("%s: %s\n", argv[i], line);
        fclose(f);
    }
    return 0;
}
