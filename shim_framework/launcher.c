/*
 * containerd-shim-polyshim-v2, the native launcher.
 *
 * containerd runs the shim binary twice per container (`start`, `delete`) and
 * waits for each. A new Python interpreter costs ~20 ms before it has imported
 * anything; this launcher instead hands its command line, environment, working
 * directory and stdio to polyshim's warm template (shim_framework/template.py),
 * whose fork runs the same Python `main` on them, and exits with the status
 * the fork reports. When no template answers, it runs `main` in a new
 * interpreter: the behaviour is the same either way, only the speed differs.
 *
 * Built by `polyshim install-launcher`, which defines:
 *   POLYSHIM_PYTHON    the interpreter polyshim is installed for
 *   POLYSHIM_TEMPLATE  that installation's template socket
 *
 * The request, NUL-separated: "run", cwd, argc, argv[1..], environ...; with
 * fds 0, 1 and 2 attached (SCM_RIGHTS). The answer: "+" once the template
 * has taken the request, then "<status>\n" from the process that ran it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#if !defined(POLYSHIM_PYTHON) || !defined(POLYSHIM_TEMPLATE)
#error "build with polyshim install-launcher (it defines POLYSHIM_PYTHON and POLYSHIM_TEMPLATE)"
#endif

#define NAME "containerd-shim-polyshim-v2"
#define REQUEST_MAX (1 << 20) /* the template refuses more */

extern char **environ;

static const char ENTRY[] =
    "import sys\nfrom shim_framework.shim_main import main\nsys.exit(main())";

/* Run `main` in a new interpreter; -P keeps the bundle (our cwd) off sys.path. */
static void run_in_new_interpreter(int argc, char **argv) {
    char **args = calloc((size_t)argc + 4, sizeof *args);
    if (args == NULL) {
        fprintf(stderr, NAME ": out of memory\n");
        exit(1);
    }
    args[0] = POLYSHIM_PYTHON;
    args[1] = "-P";
    args[2] = "-c";
    args[3] = (char *)ENTRY;
    for (int i = 1; i < argc; i++)
        args[i + 3] = argv[i];
    execv(POLYSHIM_PYTHON, args);
    fprintf(stderr, NAME ": cannot run %s: %s (reinstall polyshim, then run"
                    " `polyshim install-launcher`)\n", POLYSHIM_PYTHON, strerror(errno));
    exit(127);
}

struct buffer {
    char *data;
    size_t len, cap;
};

/* Append s and its NUL; 0 on success. */
static int append(struct buffer *b, const char *s) {
    size_t n = strlen(s) + 1;
    if (b->len + n > REQUEST_MAX)
        return -1;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        char *grown = realloc(b->data, cap);
        if (grown == NULL)
            return -1;
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

static int build_request(struct buffer *b, int argc, char **argv) {
    char cwd[PATH_MAX], count[16];
    if (getcwd(cwd, sizeof cwd) == NULL)
        return -1;
    snprintf(count, sizeof count, "%d", argc - 1);
    if (append(b, "run") || append(b, cwd) || append(b, count))
        return -1;
    for (int i = 1; i < argc; i++)
        if (append(b, argv[i]))
            return -1;
    for (char **e = environ; *e != NULL; e++)
        if (append(b, *e))
            return -1;
    b->len--; /* separators, not terminators: no NUL after the last part */
    return 0;
}

static int connect_template(void) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(POLYSHIM_TEMPLATE) >= sizeof addr.sun_path)
        return -1;
    strcpy(addr.sun_path, POLYSHIM_TEMPLATE);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Send the request with our stdio attached; 0 on success. */
static int send_request(int fd, const struct buffer *b) {
    int stdio[3] = {0, 1, 2};
    char control[CMSG_SPACE(sizeof stdio)];
    memset(control, 0, sizeof control);
    struct iovec iov = {.iov_base = b->data, .iov_len = b->len};
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control,
    };
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof stdio);
    memcpy(CMSG_DATA(cmsg), stdio, sizeof stdio);
    ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (sent < 0)
        return -1;
    for (size_t done = (size_t)sent; done < b->len; done += (size_t)sent) {
        sent = send(fd, b->data + done, b->len - done, MSG_NOSIGNAL);
        if (sent < 0 && errno != EINTR)
            return -1;
        if (sent < 0)
            sent = 0;
    }
    return shutdown(fd, SHUT_WR);
}

/* Read the answer until "\n" or EOF; its length, or -1. */
static ssize_t read_answer(int fd, char *answer, size_t size) {
    size_t got = 0;
    while (got < size - 1) {
        ssize_t n = read(fd, answer + got, size - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
        if (memchr(answer, '\n', got) != NULL)
            break;
    }
    answer[got] = '\0';
    return (ssize_t)got;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    struct buffer request = {0};
    int fd = connect_template();
    if (fd < 0 || build_request(&request, argc, argv) || send_request(fd, &request)) {
        if (fd >= 0)
            close(fd);
        run_in_new_interpreter(argc, argv); /* nothing was taken: do it ourselves */
    }
    char answer[32];
    read_answer(fd, answer, sizeof answer);
    close(fd);
    if (answer[0] != '+')
        run_in_new_interpreter(argc, argv); /* the template refused before running it */
    char *end;
    long status = strtol(answer + 1, &end, 10);
    if (end == answer + 1 || *end != '\n' || status < 0 || status > 255) {
        fprintf(stderr, NAME ": the warm template's process ended without an exit status\n");
        return 1;
    }
    return (int)status;
}
