/*
 * csvd's guest workload agent: PID 1's companion in the test guest that scripts/build-guest
 * makes. It gives tests and the demo something to check across a live migration:
 *
 *   - a counter kept in memory, incremented every period: after a migration it continues
 *     where it was; after a restart it starts again at 1 with a new boot id;
 *   - sequence records written to the guest's disk with O_DIRECT|O_DSYNC, one 4 KiB block per
 *     record in a ring at the start of the disk: a reader of the disk sees contiguous
 *     sequence numbers from one boot id if no write was lost;
 *   - optionally, a thread that dirties N MiB of RAM without pause (a busy guest);
 *   - a status line on the serial console per record:
 *       csvd-agent boot=<hex> seq=<n> counter=<n> dirty_mib=<n> passes=<n>
 *   - the ACPI power button (evdev) powers the guest off after syncing, so a graceful
 *     shutdown through QMP works.
 *
 * Settings come from the kernel command line: csvd.disk=PATH (default /dev/vda when it
 * exists), csvd.period_ms=N (100), csvd.records=N (ring size in blocks, 1024),
 * csvd.dirty_mib=N (0).
 *
 * Record layout (little endian), block i of the ring holds the record with seq % records == i:
 *   0  "CSVDSEQ1"   8  boot id   16 seq   24 counter   32 dirty passes
 *   40 FNV-1a 64 of bytes 0..40; the rest of the block is zero.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <linux/reboot.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096

static volatile uint64_t dirty_passes;

static uint64_t fnv1a(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* The value of csvd.KEY= on the kernel command line, or NULL. */
static const char *param(const char *cmdline, const char *key, char *out, size_t cap) {
    char pat[64];
    snprintf(pat, sizeof pat, "csvd.%s=", key);
    const char *p = cmdline;
    while ((p = strstr(p, pat)) != NULL) {
        if (p == cmdline || p[-1] == ' ') {
            p += strlen(pat);
            size_t n = strcspn(p, " \n");
            if (n >= cap)
                n = cap - 1;
            memcpy(out, p, n);
            out[n] = 0;
            return out;
        }
        p++;
    }
    return NULL;
}

static long param_num(const char *cmdline, const char *key, long dflt) {
    char buf[64];
    if (!param(cmdline, key, buf, sizeof buf))
        return dflt;
    char *end;
    long v = strtol(buf, &end, 10);
    return (*end || v < 0) ? dflt : v;
}

static void *dirtier(void *arg) {
    size_t len = (size_t)(long)arg << 20;
    /* volatile: the stores are the point; memory nothing reads would otherwise let the
     * compiler drop them and leave the loop counting passes over nothing. */
    volatile unsigned char *mem = malloc(len);
    if (!mem) {
        printf("csvd-agent: cannot allocate %zu bytes to dirty\n", len);
        return NULL;
    }
    for (;;) {
        for (size_t off = 0; off < len; off += 4096)
            mem[off]++;
        dirty_passes++;
    }
    return NULL;
}

/* Powers off on KEY_POWER from one input device (`arg` is its descriptor). */
static void *power_button(void *arg) {
    int fd = (int)(long)arg;
    struct input_event ev;
    while (read(fd, &ev, sizeof ev) == sizeof ev) {
        if (ev.type == EV_KEY && ev.code == KEY_POWER && ev.value == 1) {
            printf("csvd-agent: power button: powering off\n");
            fflush(stdout);
            sync();
            reboot(LINUX_REBOOT_CMD_POWER_OFF);
        }
    }
    return NULL;
}

/* Watches every input device that has a power key (the ACPI power button among them). */
static void watch_power_buttons(void) {
    for (int i = 0; i < 16; i++) {
        char path[32];
        snprintf(path, sizeof path, "/dev/input/event%d", i);
        int fd = open(path, O_RDONLY);
        if (fd < 0)
            continue;
        unsigned long keys[KEY_MAX / (8 * sizeof(long)) + 1] = {0};
        pthread_t t;
        if (ioctl(fd, EVIOCGBIT(EV_KEY, sizeof keys), keys) >= 0 &&
            (keys[KEY_POWER / (8 * sizeof(long))] >> (KEY_POWER % (8 * sizeof(long)))) & 1 &&
            pthread_create(&t, NULL, power_button, (void *)(long)fd) == 0)
            continue;
        close(fd);
    }
}

int main(void) {
    char cmdline[4096] = {0};
    FILE *f = fopen("/proc/cmdline", "r");
    if (f) {
        if (!fgets(cmdline, sizeof cmdline, f))
            cmdline[0] = 0;
        fclose(f);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);

    char disk[256];
    if (!param(cmdline, "disk", disk, sizeof disk)) {
        struct stat st;
        strcpy(disk, stat("/dev/vda", &st) == 0 ? "/dev/vda" : "");
    }
    long period_ms = param_num(cmdline, "period_ms", 100);
    long records = param_num(cmdline, "records", 1024);
    long dirty_mib = param_num(cmdline, "dirty_mib", 0);
    if (records < 1)
        records = 1;

    uint64_t boot = 0;
    int r = open("/dev/urandom", O_RDONLY);
    if (r >= 0) {
        if (read(r, &boot, sizeof boot) != sizeof boot)
            boot = 0;
        close(r);
    }
    if (!boot)
        boot = (uint64_t)time(NULL) * 2654435761ULL;

    watch_power_buttons();
    pthread_t t;
    if (dirty_mib > 0)
        pthread_create(&t, NULL, dirtier, (void *)dirty_mib);

    int fd = disk[0] ? open(disk, O_WRONLY | O_DIRECT | O_DSYNC) : -1;
    if (disk[0] && fd < 0)
        printf("csvd-agent: cannot open %s: %s\n", disk, strerror(errno));
    unsigned char *blk = NULL;
    if (posix_memalign((void **)&blk, BLOCK, BLOCK) != 0)
        return 1;
    memset(blk, 0, BLOCK);
    printf("csvd-agent: started boot=%016llx disk=%s period_ms=%ld records=%ld dirty_mib=%ld\n",
           (unsigned long long)boot, fd >= 0 ? disk : "none", period_ms, records, dirty_mib);

    uint64_t counter = 0;
    for (uint64_t seq = 1;; seq++) {
        counter++;
        uint64_t passes = dirty_passes;
        if (fd >= 0) {
            memcpy(blk, "CSVDSEQ1", 8);
            memcpy(blk + 8, &boot, 8);
            memcpy(blk + 16, &seq, 8);
            memcpy(blk + 24, &counter, 8);
            memcpy(blk + 32, &passes, 8);
            uint64_t sum = fnv1a(blk, 40);
            memcpy(blk + 40, &sum, 8);
            off_t at = (off_t)((seq % (uint64_t)records) * BLOCK);
            if (pwrite(fd, blk, BLOCK, at) != BLOCK)
                printf("csvd-agent: write of seq %llu failed: %s\n", (unsigned long long)seq,
                       strerror(errno));
        }
        printf("csvd-agent boot=%016llx seq=%llu counter=%llu dirty_mib=%ld passes=%llu\n",
               (unsigned long long)boot, (unsigned long long)seq, (unsigned long long)counter,
               dirty_mib, (unsigned long long)passes);
        struct timespec ts = {period_ms / 1000, (period_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
}
