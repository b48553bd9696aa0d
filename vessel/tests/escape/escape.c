// escape: what an attacker's code tries from inside a vessel. Built static
// by `cargo xtask image` and run in a vessel by tests/escape.rs. Each probe
// prints one line "NAME RESULT", RESULT being "ok" (it worked), an errno
// name (the refusal), or a probe-specific word; the test asserts each line.
//
// usage: escape HOST_PID   (a pid that exists on the host, not in here)
//        escape setxattr PATH NAME VALUE
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

static const char *ename(int e) {
    switch (e) {
    case 0: return "ok";
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case ENOSYS: return "ENOSYS";
    case EROFS: return "EROFS";
    case ESRCH: return "ESRCH";
    case ENOENT: return "ENOENT";
    case EINVAL: return "EINVAL";
    case EEXIST: return "EEXIST";
    case EBADF: return "EBADF";
    case ENOTDIR: return "ENOTDIR";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    default: { static char b[32]; snprintf(b, sizeof b, "errno%d", e); return b; }
    }
}

static void report(const char *name, long rc) { printf("%s %s\n", name, ename(rc < 0 ? errno : 0)); }

// clone(2) with extra flags, like fork: the child exits at once.
static void try_clone(const char *name, unsigned long flags) {
    errno = 0;
    long pid = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
    if (pid == 0) _exit(0);
    if (pid > 0) waitpid(pid, NULL, 0);
    report(name, pid);
}

static void try_clone3(const char *name, unsigned long flags) {
    struct clone_args a;
    memset(&a, 0, sizeof a);
    a.flags = flags;
    a.exit_signal = SIGCHLD;
    errno = 0;
    long pid = syscall(SYS_clone3, &a, sizeof a);
    if (pid == 0) _exit(0);
    if (pid > 0) waitpid(pid, NULL, 0);
    report(name, pid);
}

// mknod, then open what was made (when mknod worked).
static void try_device(const char *name, mode_t type, int major, int minor) {
    char path[64], n[64];
    snprintf(path, sizeof path, "/tmp/dev-%s", name);
    unlink(path);
    errno = 0;
    long rc = mknod(path, type | 0666, makedev(major, minor));
    snprintf(n, sizeof n, "mknod_%s", name);
    report(n, rc);
    snprintf(n, sizeof n, "open_%s", name);
    if (rc == 0) {
        errno = 0;
        int fd = open(path, O_RDONLY | O_NONBLOCK);
        report(n, fd);
        if (fd >= 0) close(fd);
        unlink(path);
    } else {
        printf("%s skipped\n", n);
    }
}

// Writes to the first of `paths` that exists.
static void try_write(const char *name, const char **paths, const char *data) {
    for (; *paths; paths++) {
        if (access(*paths, F_OK) != 0) continue;
        errno = 0;
        int fd = open(*paths, O_WRONLY);
        long rc = fd;
        if (fd >= 0) {
            rc = write(fd, data, strlen(data));
            close(fd);
        }
        report(name, rc);
        return;
    }
    printf("%s absent\n", name);
}

// Reads a file: "empty" when it reads as nothing (masked), else ok/errno.
static void try_read(const char *name, const char *path) {
    errno = 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0) { report(name, -1); return; }
    char buf[64];
    long n = read(fd, buf, sizeof buf);
    close(fd);
    if (n == 0) printf("%s empty\n", name);
    else report(name, n);
}

int main(int argc, char **argv) {
    // escape setxattr PATH NAME VALUE: what busybox cannot do.
    if (argc == 5 && !strcmp(argv[1], "setxattr")) {
        if (setxattr(argv[2], argv[3], argv[4], strlen(argv[4]), 0)) { perror("setxattr"); return 1; }
        return 0;
    }
    int host_pid = argc > 1 ? atoi(argv[1]) : 1;
    setvbuf(stdout, NULL, _IOLBF, 0);

    try_device("chr", S_IFCHR, 10, 237);   // /dev/loop-control
    try_device("blk", S_IFBLK, 7, 0);      // /dev/loop0
    {   // a device node of the allowed set must open
        errno = 0;
        int fd = open("/dev/null", O_WRONLY);
        report("open_null", fd);
    }

    try_clone("fork", 0);
    try_clone("clone_newuser", CLONE_NEWUSER);
    try_clone("clone_newnet", CLONE_NEWNET);
    try_clone("clone_newns", CLONE_NEWNS);
    try_clone("clone_newuser_newnet", CLONE_NEWUSER | CLONE_NEWNET);
    try_clone3("clone3_newuser", CLONE_NEWUSER);
    try_clone3("clone3_plain", 0);
    report("unshare_newuser", unshare(CLONE_NEWUSER));
    report("unshare_newnet", unshare(CLONE_NEWNET));
    report("unshare_newns", unshare(CLONE_NEWNS));

    {
        struct { uint32_t sq, cq, flags, sq_thread_cpu, sq_thread_idle, features, wq_fd, resv[3];
                 uint64_t off[16]; } p;
        memset(&p, 0, sizeof p);
        errno = 0;
        long fd = syscall(__NR_io_uring_setup, 1, &p);
        report("io_uring_setup", fd);
    }
    {
        union { struct { uint32_t type, key, value, max; } m; char pad[128]; } attr;
        memset(&attr, 0, sizeof attr);
        attr.m.type = 1; attr.m.key = 4; attr.m.value = 4; attr.m.max = 1;   // BPF_MAP_TYPE_HASH
        errno = 0;
        report("bpf", syscall(__NR_bpf, 0 /* BPF_MAP_CREATE */, &attr, sizeof attr));
    }
    {
        char attr[128];
        memset(attr, 0, sizeof attr);
        ((uint32_t *)attr)[1] = sizeof attr;   // size; type 0 (hardware), config 0 (cycles)
        errno = 0;
        report("perf_event_open", syscall(__NR_perf_event_open, attr, 0, -1, -1, 0));
    }
    errno = 0;
    report("keyctl", syscall(__NR_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3 /* session */, 1));
    errno = 0;
    report("add_key", syscall(__NR_add_key, "user", "vessel", "x", 1, -3));
    errno = 0;
    report("userfaultfd", syscall(__NR_userfaultfd, 0));
    errno = 0;
    report("personality_read_implies_exec", personality(READ_IMPLIES_EXEC));
    errno = 0;
    report("personality_query", personality(0xffffffff));
    errno = 0;
    report("mount_tmpfs", mount("none", "/mnt", "tmpfs", 0, NULL));
    errno = 0;
    report("umount_proc", umount2("/proc", MNT_DETACH));
    errno = 0;
    report("pivot_root", syscall(__NR_pivot_root, "/tmp", "/tmp"));
    errno = 0;
    report("swapon", syscall(__NR_swapon, "/tmp/swap", 0));
    errno = 0;
    report("reboot", syscall(__NR_reboot, 0xfee1dead, 672274793, 0x4321fedc, NULL));
    errno = 0;
    report("init_module", syscall(__NR_init_module, NULL, 0, ""));
    errno = 0;
    report("kexec_load", syscall(__NR_kexec_load, 0, 0, NULL, 0));
    {
        struct { unsigned int bytes; int type; unsigned char h[128]; } fh;
        memset(&fh, 0, sizeof fh);
        fh.bytes = 8;
        errno = 0;
        report("open_by_handle_at", syscall(__NR_open_by_handle_at, AT_FDCWD, &fh, O_RDONLY));
    }
    errno = 0;
    report("setns", syscall(__NR_setns, 0, 0));

    {
        const char *limit[] = {"/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/pids.max",
                               "/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max", NULL};
        try_write("cgroup_write", limit, "77");
        const char *dirs[] = {"/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup", NULL};
        for (const char **d = dirs; *d; d++) {
            if (access(*d, F_OK) != 0) continue;
            char p[128];
            snprintf(p, sizeof p, "%s/escape", *d);
            errno = 0;
            long rc = mkdir(p, 0755);
            report("cgroup_mkdir", rc);
            if (rc == 0) rmdir(p);
            break;
        }
        const char *sysrq[] = {"/proc/sysrq-trigger", NULL};
        try_write("sysrq_trigger", sysrq, "h");
        const char *core[] = {"/proc/sys/kernel/core_pattern", NULL};
        try_write("core_pattern", core, "|/tmp/x");
    }
    errno = 0;
    report("ptrace_outside", ptrace(PTRACE_ATTACH, host_pid, 0, 0));
    errno = 0;
    report("kill_outside", kill(host_pid, 0));
    try_read("read_kcore", "/proc/kcore");
    try_read("read_interrupts", "/proc/interrupts");
    try_read("read_keys", "/proc/keys");
    try_read("read_timer_list", "/proc/timer_list");
    {
        errno = 0;
        int fd = open("/sys/devices/virtual/powercap", O_RDONLY | O_DIRECTORY);
        long n = -1;
        if (fd >= 0) {
            char buf[4096];
            n = syscall(__NR_getdents64, fd, buf, sizeof buf);
            close(fd);
            // "." and ".." only: 48 bytes.
            printf("list_powercap %s\n", n >= 0 && n <= 48 ? "empty" : n > 48 ? "ok" : ename(errno));
        } else {
            report("list_powercap", -1);
        }
    }
    printf("done ok\n");
    return 0;
}
