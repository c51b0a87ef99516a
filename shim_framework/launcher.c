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
 *   POLYSHIM_DELETED_FILE, POLYSHIM_KILLED_STATUS, POLYSHIM_VALUE_FLAGS
 *                      bootstrap's DELETED_FILE, KILLED_STATUS and _VALUE_FLAGS, so the
 *                      native delete cannot drift from the Python one
 *
 * The request, NUL-separated: "run", cwd, argc, argv[1..], environ...; with
 * fds 0, 1 and 2 attached (SCM_RIGHTS). The answer: "+" once the template
 * has taken the request, then "<status>\n" from the process that ran it.
 *
 * One case needs no Python at all: `delete` after the shim deleted the task
 * itself, the usual end of every container. bootstrap.delete then only
 * answers from the bundle's marker; so does answer_delete, and anything else
 * (no marker, something still mounted, flags it does not know) goes to Python.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if !defined(POLYSHIM_PYTHON) || !defined(POLYSHIM_TEMPLATE) || !defined(POLYSHIM_DELETED_FILE) \
    || !defined(POLYSHIM_KILLED_STATUS) || !defined(POLYSHIM_VALUE_FLAGS)
#error "build with polyshim install-launcher (it defines the POLYSHIM_* macros)"
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

/* bootstrap._VALUE_FLAGS, and the boolean flag a delete may carry. */
static const char *const VALUE_FLAGS[] = {POLYSHIM_VALUE_FLAGS, NULL};
static const char *const BOOL_FLAGS[] = {"debug", NULL};

static int is_flag(const char *name, size_t len, const char *const *flags) {
    for (; *flags != NULL; flags++)
        if (strlen(*flags) == len && strncmp(name, *flags, len) == 0)
            return 1;
    return 0;
}

/* The bundle of a `delete` command line, parsed by Go's flag rules as
 * bootstrap.parse_flags does: "" for none given, NULL when the action is not
 * `delete` (or is followed by more) or the command line is anything unusual. */
static const char *delete_bundle(int argc, char **argv) {
    const char *bundle = "";
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (arg[0] != '-' || arg[1] == '\0')
            return strcmp(arg, "delete") == 0 && i == argc - 1 ? bundle : NULL;
        const char *name = arg + (arg[1] == '-' ? 2 : 1);
        const char *value = strchr(name, '=');
        size_t len = value != NULL ? (size_t)(value - name) : strlen(name);
        if (len == 0) /* "--": let Python handle it */
            return NULL;
        int is_bool = is_flag(name, len, BOOL_FLAGS);
        if (!is_bool && !is_flag(name, len, VALUE_FLAGS))
            return NULL; /* -v, -info, or unknown: not a plain delete */
        if (!is_bool && value == NULL) {
            if (i + 1 >= argc)
                return NULL;
            value = argv[++i];
        } else if (value != NULL) {
            value++;
        }
        if (len == 6 && strncmp(name, "bundle", 6) == 0)
            bundle = value;
    }
    return NULL;
}

/* Is anything mounted at or below `path`? 1 also when mountinfo cannot tell us, or
 * when `path` holds a character mountinfo escapes (we compare raw fields). */
static int mounted_at_or_below(const char *path) {
    if (strpbrk(path, " \t\n\\") != NULL)
        return 1;
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (f == NULL)
        return 1;
    size_t n = strlen(path);
    char *line = NULL;
    size_t cap = 0;
    int found = 0;
    while (!found && getline(&line, &cap, f) > 0) {
        char *point = line;
        for (int field = 0; field < 4 && point != NULL; field++) {
            point = strchr(point, ' ');
            if (point != NULL)
                point++;
        }
        if (point == NULL)
            continue;
        size_t len = strcspn(point, " \n");
        found = len >= n && strncmp(point, path, n) == 0 && (len == n || point[n] == '/');
    }
    free(line);
    fclose(f);
    return found;
}

static size_t put_varint(unsigned char *out, uint64_t value) {
    size_t n = 0;
    while (value > 0x7f) {
        out[n++] = (unsigned char)(value & 0x7f) | 0x80;
        value >>= 7;
    }
    out[n++] = (unsigned char)value;
    return n;
}

/* Field `field` as a varint, left out when zero (proto3). */
static size_t put_field(unsigned char *out, unsigned field, uint64_t value) {
    if (value == 0)
        return 0;
    size_t n = put_varint(out, field << 3);
    return n + put_varint(out + n, value);
}

/* Answer `delete` as bootstrap.delete does when the shim deleted the task itself:
 * DeleteResponse{pid from the marker, exit_status 137, exited_at now}. Returns
 * only if that is not the case (then Python decides). */
static void answer_delete(int argc, char **argv) {
    char cwd[PATH_MAX], path[PATH_MAX];
    const char *bundle = delete_bundle(argc, argv);
    if (bundle == NULL)
        return;
    if (bundle[0] == '\0') {
        if (getcwd(cwd, sizeof cwd) == NULL)
            return;
        bundle = cwd;
    }
    if ((size_t)snprintf(path, sizeof path, "%s/" POLYSHIM_DELETED_FILE, bundle) >= sizeof path)
        return;
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return;
    char text[32] = "";
    size_t got = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[got] = '\0';
    char *end;
    long long pid = strtoll(text, &end, 10);
    while (*end == ' ' || *end == '\n' || *end == '\t' || *end == '\r')
        end++;
    if (*end != '\0' || pid < 0 || pid > INT32_MAX)
        return;
    if ((size_t)snprintf(path, sizeof path, "%s/rootfs", bundle) >= sizeof path)
        return;
    if (mounted_at_or_below(path))
        return;

    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    unsigned char stamp[32], response[64];
    size_t stamp_len = put_field(stamp, 1, (uint64_t)now.tv_sec);
    stamp_len += put_field(stamp + stamp_len, 2, (uint64_t)now.tv_nsec);
    size_t len = put_field(response, 1, (uint64_t)pid);
    len += put_field(response + len, 2, POLYSHIM_KILLED_STATUS);
    len += put_varint(response + len, 3 << 3 | 2);
    len += put_varint(response + len, stamp_len);
    memcpy(response + len, stamp, stamp_len);
    len += stamp_len;
    for (size_t done = 0; done < len;) {
        ssize_t n = write(1, response + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            exit(1);
        done += (size_t)n;
    }
    exit(0);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    answer_delete(argc, argv);
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
