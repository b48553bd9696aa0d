/*
 * vessel's sandbox agent: the init process of a live vessel's container.
 *
 * It runs inside the container, with the container's isolation (user
 * namespace, seccomp, capabilities, no_new_privs, cgroups): everything it
 * starts inherits exactly that. It speaks a framed protocol with the host
 * over its stdin (requests) and stdout (events), so it works the same under
 * every backend (a youki runner's pipes, containerd's FIFOs) and needs no
 * socket inside the container. See vessel-runtime/src/sandbox/protocol.rs
 * for the frames; both sides must agree on AGENT_VERSION.
 *
 * Built static (no libc in the image is assumed) by vessel-runtime's
 * build script. It is pid 1 of the container's pid namespace: it reaps
 * every orphan, and since the kernel drops signals to a namespace's init
 * that it has no handler for, code in the vessel cannot kill it (SIGKILL
 * and SIGSTOP included); it is not dumpable, so it cannot be ptraced or
 * have its fds read through /proc by code without CAP_SYS_PTRACE.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION 1
#define MAX_PROCS 1024
#define MAX_FRAME (1u << 20)
#define CHUNK 65536
/* How long output may stay open after a process ended (a descendant
 * holding it) before the agent stops relaying it. */
#define GRACE_MS 200

enum { F_TTY = 1, F_KEEP_GROUP = 2, F_STDIN = 4 };

struct proc {
    uint32_t id;
    pid_t pid;
    int in, out, err; /* -1 when closed */
    int exited, status, keep_group;
    long long ended_ms;
    /* Input not yet written (the process is not reading): the host sends
     * the next frame only after an 'A' (acknowledged), so one at most. */
    unsigned char *inbuf;
    uint32_t inlen, inoff;
    int close_in;
};

static struct proc procs[MAX_PROCS];
static int nprocs;
static char **empty_env = (char *[]){NULL};

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            /* The host is gone: nothing is left to serve. */
            _exit(0);
        }
        p += n;
        len -= (size_t)n;
    }
}

static void send_frame(char kind, uint32_t id, const void *data, uint32_t len) {
    unsigned char h[9];
    h[0] = (unsigned char)kind;
    memcpy(h + 1, &id, 4);
    memcpy(h + 5, &len, 4);
    write_all(1, h, 9);
    if (len) write_all(1, data, len);
}

static void send_u32(char kind, uint32_t id, uint32_t v) { send_frame(kind, id, &v, 4); }

static int read_full(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n == 0) return 0;
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 1;
}

/* OOM kills so far in the agent's memory cgroup (the container's): v1, v2
 * or hybrid, at the path /proc/self/cgroup names ("/" under a cgroup
 * namespace; the delegated subtree's path rootless, where there is none). */
static uint64_t oom_kills(void) {
    char v1[512] = "", v2[512] = "";
    FILE *f = fopen("/proc/self/cgroup", "re");
    if (f) {
        char line[600];
        while (fgets(line, sizeof line, f)) {
            line[strcspn(line, "\n")] = 0;
            char *a = strchr(line, ':');
            char *b = a ? strchr(a + 1, ':') : NULL;
            if (!b) continue;
            *b = 0;
            const char *ctrls = a + 1, *path = b + 1;
            if (!*ctrls) snprintf(v2, sizeof v2, "%s", path);
            else if (strstr(ctrls, "memory")) snprintf(v1, sizeof v1, "%s", path);
        }
        fclose(f);
    }
    char files[3][1100];
    snprintf(files[0], sizeof files[0], "/sys/fs/cgroup/memory%s/memory.oom_control", v1);
    snprintf(files[1], sizeof files[1], "/sys/fs/cgroup%s/memory.events", v2);
    snprintf(files[2], sizeof files[2], "/sys/fs/cgroup/unified%s/memory.events", v2);
    uint64_t most = 0;
    for (size_t i = 0; i < 3; i++) {
        FILE *g = fopen(files[i], "re");
        if (!g) continue;
        char line[128];
        unsigned long long n;
        while (fgets(line, sizeof line, g))
            if (sscanf(line, "oom_kill %llu", &n) == 1 && n > most) most = n;
        fclose(g);
    }
    return most;
}

/* 'P' or 'X': a u32 (pid, wait status) and the OOM kills so far. */
static void send_with_oom(char kind, uint32_t id, uint32_t v) {
    unsigned char d[12];
    uint64_t oom = oom_kills();
    memcpy(d, &v, 4);
    memcpy(d + 4, &oom, 8);
    send_frame(kind, id, d, 12);
}

static struct proc *find(uint32_t id) {
    for (int i = 0; i < nprocs; i++)
        if (procs[i].id == id) return &procs[i];
    return NULL;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

/* Sends the exit once the process ended and its output is closed (or
 * the grace period passed), and forgets it. */
static void maybe_finish(struct proc *p) {
    if (!p->exited) return;
    if (p->out >= 0 || p->err >= 0) {
        if (now_ms() - p->ended_ms < GRACE_MS) return;
        if (p->out >= 0) send_frame('O', p->id, NULL, 0);
        if (p->err >= 0) send_frame('R', p->id, NULL, 0);
        close_fd(&p->out);
        close_fd(&p->err);
    }
    close_fd(&p->in);
    free(p->inbuf);
    send_with_oom('X', p->id, (uint32_t)p->status);
    *p = procs[--nprocs];
}

/* Writes what input is pending without blocking; acknowledges a frame
 * once it is all written (or dropped: the process closed its input). */
static void flush_input(struct proc *p) {
    while (p->inbuf && p->inoff < p->inlen) {
        if (p->in < 0) break;
        ssize_t n = write(p->in, p->inbuf + p->inoff, p->inlen - p->inoff);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) {
            close_fd(&p->in);
            break;
        }
        p->inoff += (uint32_t)n;
    }
    if (p->inbuf) {
        free(p->inbuf);
        p->inbuf = NULL;
        send_frame('A', p->id, NULL, 0);
    }
    if (p->close_in) close_fd(&p->in);
}

static void reap(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0) return;
        for (int i = 0; i < nprocs; i++) {
            struct proc *p = &procs[i];
            if (p->pid != pid || p->exited) continue;
            p->exited = 1;
            p->status = status;
            p->ended_ms = now_ms();
            /* A command's leftovers end with it, as they did when each
             * command had its own container. */
            if (!p->keep_group) kill(-pid, SIGKILL);
        }
    }
}

/* Parses a spawn request and starts it; replies 'P' (pid) or 'E' (errno). */
static void spawn(uint32_t id, unsigned char *d, uint32_t len) {
    uint32_t flags, uid, gid, ngroups, argc, envc;
    uint16_t rows, cols;
    if (len < 28) goto bad;
    memcpy(&flags, d, 4);
    memcpy(&uid, d + 4, 4);
    memcpy(&gid, d + 8, 4);
    memcpy(&rows, d + 12, 2);
    memcpy(&cols, d + 14, 2);
    memcpy(&ngroups, d + 16, 4);
    memcpy(&argc, d + 20, 4);
    memcpy(&envc, d + 24, 4);
    if (ngroups > 256 || argc == 0 || argc > 65536 || envc > 65536) goto bad;
    uint32_t off = 28;
    if ((uint64_t)off + 4ull * ngroups > len) goto bad;
    gid_t groups[256];
    for (uint32_t i = 0; i < ngroups; i++) memcpy(&groups[i], d + off + 4 * i, 4);
    off += 4 * ngroups;
    /* cwd, argv, env: NUL-terminated strings; the frame ends with a NUL. */
    if (d[len - 1] != 0) goto bad;
    char **strs = calloc((size_t)argc + envc + 3, sizeof(char *));
    if (!strs) goto bad;
    uint32_t want = 1 + argc + envc;
    for (uint32_t i = 0; i < want; i++) {
        if (off >= len) {
            free(strs);
            goto bad;
        }
        strs[i] = (char *)d + off;
        off += (uint32_t)strlen(strs[i]) + 1;
    }
    char *cwd = strs[0];
    char **argv = strs + 1;
    char **envp = strs + 2 + argc; /* argv[argc] is the NULL between them */
    memmove(envp, strs + 1 + argc, envc * sizeof(char *));
    argv[argc] = NULL;
    envp[envc] = NULL;
    if (nprocs >= MAX_PROCS || find(id)) {
        free(strs);
        send_u32('E', id, EAGAIN);
        return;
    }
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, status[2];
    int master = -1, slave = -1;
    if (pipe2(status, O_CLOEXEC) < 0) goto fail;
    if (flags & F_TTY) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0) goto fail;
        struct winsize ws = {.ws_row = rows ? rows : 24, .ws_col = cols ? cols : 80};
        ioctl(master, TIOCSWINSZ, &ws);
        slave = open(ptsname(master), O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (slave < 0) goto fail;
    } else {
        if ((flags & F_STDIN) && pipe2(in, O_CLOEXEC) < 0) goto fail;
        if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) goto fail;
    }
    pid_t pid = fork();
    if (pid < 0) goto fail;
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        setsid();
        if (flags & F_TTY) {
            ioctl(slave, TIOCSCTTY, 0);
            dup2(slave, 0);
            dup2(slave, 1);
            dup2(slave, 2);
        } else {
            int null = -1;
            if (in[0] >= 0) {
                dup2(in[0], 0);
            } else {
                null = open("/dev/null", O_RDONLY);
                if (null >= 0) dup2(null, 0);
            }
            dup2(out[1], 1);
            dup2(err[1], 2);
        }
        int e = 0;
        if (setgroups(ngroups, groups) < 0 && errno != EPERM) e = errno;
        if (!e && setgid(gid) < 0) e = errno;
        if (!e && setuid(uid) < 0) e = errno;
        if (!e && *cwd && chdir(cwd) < 0) e = errno;
        if (!e) {
            extern char **environ;
            environ = envp;
            execvp(argv[0], argv);
            e = errno;
        }
        write(status[1], &e, sizeof e);
        _exit(127);
    }
    close(status[1]);
    if (slave >= 0) close(slave);
    if (in[0] >= 0) close(in[0]);
    if (out[1] >= 0) close(out[1]);
    if (err[1] >= 0) close(err[1]);
    int e = 0;
    ssize_t n;
    do n = read(status[0], &e, sizeof e);
    while (n < 0 && errno == EINTR);
    close(status[0]);
    free(strs);
    if (n > 0) {
        /* exec failed: the child exits 127; reap it with the others. */
        if (master >= 0) close(master);
        if (in[1] >= 0) close(in[1]);
        close_fd(&out[0]);
        close_fd(&err[0]);
        send_u32('E', id, (uint32_t)e);
        return;
    }
    struct proc *p = &procs[nprocs++];
    memset(p, 0, sizeof *p);
    p->id = id;
    p->pid = pid;
    p->keep_group = (flags & F_KEEP_GROUP) != 0;
    if (master >= 0) {
        p->in = fcntl(master, F_DUPFD_CLOEXEC, 0);
        p->out = master;
        p->err = -1;
    } else {
        p->in = in[1];
        p->out = out[0];
        p->err = err[0];
    }
    if (p->in >= 0) fcntl(p->in, F_SETFL, fcntl(p->in, F_GETFL) | O_NONBLOCK);
    send_with_oom('P', id, (uint32_t)pid);
    return;
fail:
    e = errno;
    for (int *fd = &in[0]; fd <= &err[1]; fd++)
        if (*fd >= 0) close(*fd);
    if (master >= 0) close(master);
    if (slave >= 0) close(slave);
    send_u32('E', id, (uint32_t)e);
    return;
bad:
    send_u32('E', id, EINVAL);
}

/* Whether every process of the namespace but this one is stopped (or a zombie). */
static int all_stopped(void) {
    DIR *d = opendir("/proc");
    if (!d) return 1;
    struct dirent *e;
    int stopped = 1;
    while (stopped && (e = readdir(d))) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end || pid <= 1) continue;
        char path[64], buf[512];
        snprintf(path, sizeof path, "/proc/%ld/stat", pid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) continue;
        buf[n] = 0;
        char *s = strrchr(buf, ')');
        if (s && s[1] == ' ' && s[2] != 'T' && s[2] != 't' && s[2] != 'Z' && s[2] != 'X') stopped = 0;
    }
    closedir(d);
    return stopped;
}

static void request(char kind, uint32_t id, unsigned char *d, uint32_t len) {
    struct proc *p;
    switch (kind) {
    case 'S':
        spawn(id, d, len);
        break;
    case 'I':
        p = find(id);
        if (!p || p->in < 0 || p->inbuf) {
            /* Nowhere to go: acknowledged, so the host moves on. */
            if (len) send_frame('A', id, NULL, 0);
            break;
        }
        if (len == 0) {
            p->close_in = 1;
        } else {
            p->inbuf = malloc(len);
            if (!p->inbuf) break;
            memcpy(p->inbuf, d, len);
            p->inlen = len;
            p->inoff = 0;
        }
        flush_input(p);
        break;
    case 'K': {
        uint32_t sig;
        if (len != 4) break;
        memcpy(&sig, d, 4);
        p = find(id);
        if (p && !p->exited) {
            kill(-p->pid, (int)sig);
            kill(p->pid, (int)sig);
        }
        break;
    }
    case 'F':
        kill(-1, SIGSTOP);
        for (int i = 0; i < 2000 && !all_stopped(); i++) usleep(500);
        send_frame('f', id, NULL, 0);
        break;
    case 'T':
        kill(-1, SIGCONT);
        send_frame('t', id, NULL, 0);
        break;
    case 'Q':
        /* Stop everything and end: the container ends with its init. */
        kill(-1, SIGKILL);
        _exit(0);
    default:
        break;
    }
}

int main(void) {
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    signal(SIGPIPE, SIG_IGN);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    (void)empty_env;
    send_u32('H', 0, AGENT_VERSION);
    unsigned char *frame = malloc(MAX_FRAME);
    unsigned char *buf = malloc(CHUNK);
    if (!frame || !buf) return 1;
    for (;;) {
        struct pollfd fds[2 + 3 * MAX_PROCS];
        int owner[2 + 3 * MAX_PROCS];
        int nf = 0;
        fds[nf++] = (struct pollfd){.fd = 0, .events = POLLIN};
        fds[nf++] = (struct pollfd){.fd = sfd, .events = POLLIN};
        int pending = 0;
        for (int i = 0; i < nprocs; i++) {
            if (procs[i].exited) pending = 1;
            if (procs[i].inbuf && procs[i].in >= 0)
                owner[nf] = i * 2 + 2 * MAX_PROCS, fds[nf++] = (struct pollfd){.fd = procs[i].in, .events = POLLOUT};
            if (procs[i].out >= 0) owner[nf] = i * 2, fds[nf++] = (struct pollfd){.fd = procs[i].out, .events = POLLIN};
            if (procs[i].err >= 0) owner[nf] = i * 2 + 1, fds[nf++] = (struct pollfd){.fd = procs[i].err, .events = POLLIN};
        }
        int r = poll(fds, (nfds_t)nf, pending ? GRACE_MS / 4 : -1);
        if (r < 0 && errno != EINTR) return 1;
        if (r > 0 && (fds[1].revents & POLLIN)) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) > 0) {}
            reap();
        }
        /* Output before requests and exits: an exit never overtakes output. */
        for (int k = 2; r > 0 && k < nf; k++) {
            if (!fds[k].revents) continue;
            if (owner[k] >= 2 * MAX_PROCS) {
                struct proc *p = &procs[(owner[k] - 2 * MAX_PROCS) / 2];
                if (p->in == fds[k].fd) flush_input(p);
                continue;
            }
            struct proc *p = &procs[owner[k] / 2];
            int *fd = owner[k] % 2 ? &p->err : &p->out;
            if (*fd != fds[k].fd) continue;
            ssize_t n = read(*fd, buf, CHUNK);
            if (n < 0 && errno == EINTR) continue;
            char kind = owner[k] % 2 ? 'R' : 'O';
            if (n > 0) {
                send_frame(kind, p->id, buf, (uint32_t)n);
            } else {
                /* EOF, or EIO from a pty whose last writer is gone. */
                send_frame(kind, p->id, NULL, 0);
                close_fd(fd);
            }
        }
        if (r > 0 && (fds[0].revents & (POLLIN | POLLHUP))) {
            unsigned char h[9];
            if (read_full(0, h, 9) <= 0) {
                /* The host is gone: so is the vessel's sandbox. */
                kill(-1, SIGKILL);
                return 0;
            }
            uint32_t id, len;
            memcpy(&id, h + 1, 4);
            memcpy(&len, h + 5, 4);
            if (len > MAX_FRAME || (len && read_full(0, frame, len) <= 0)) {
                kill(-1, SIGKILL);
                return 1;
            }
            request((char)h[0], id, frame, len);
        }
        for (int i = nprocs - 1; i >= 0; i--) maybe_finish(&procs[i]);
    }
}
