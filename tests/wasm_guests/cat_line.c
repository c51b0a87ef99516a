/* Reads one line from stdin and echoes it as "got: <line>"; "got EOF" without one. */
#include <stdio.h>

int main(void) {
    char line[1024];
    if (!fgets(line, sizeof line, stdin)) {
        printf("got EOF\n");
        return 1;
    }
    printf("got: %s", line);
    return 0;
}
