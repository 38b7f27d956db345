/*
 * A VM outlives its machine's C handles without touching freed memory: a guest run is in
 * flight on another thread (spinning on a word of guest RAM) when the main thread frees the
 * machine with hm_machine_free(); the main thread then releases the guest through the RAM
 * pointer it had, and the guest finishes its ops. The KVM slots keep the RAM mapped until the
 * run ends, so under valgrind (suite 'c') this reports no invalid access and no leak.
 *
 * Without /dev/kvm the test is skipped (exit 77), except under CI=true where it fails.
 */
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../boards/boards.h"
#include "../test-util.h"

#define STARTED_GPA (1 * MiB)
#define RELEASE_GPA (2 * MiB)
#define RESULT_GPA (3 * MiB)

struct run {
    HmGuestOp ops[4];
    bool ok;
    char error[256];
};

static void *guest_thread(void *arg)
{
    struct run *r = arg;
    Error *err = NULL;

    r->ok = hm_kvm_guest_run(r->ops, 4, &err);
    if (!r->ok) {
        snprintf(r->error, sizeof(r->error), "%s", error_get_pretty(err));
        error_free(err);
    }
    return NULL;
}

static volatile uint64_t *guest_word(void *ram, uint64_t gpa)
{
    return (volatile uint64_t *)((char *)ram + gpa);
}

int main(void)
{
    const char *argv[] = { "test", "-M", "none", "-m", "64M", "-accel", "kvm" };
    struct run r = {
        .ops = {
            { HM_GUEST_OP_WRITE, STARTED_GPA, 1 },
            { HM_GUEST_OP_WAIT_WHILE, RELEASE_GPA, 0 },
            { HM_GUEST_OP_WRITE, RESULT_GPA, 0x600d },
            { HM_GUEST_OP_READ, RESULT_GPA, 0 },
        },
    };
    const char *ci = getenv("CI");
    Error *err = NULL;
    MachineState *ms;
    pthread_t thread;
    void *ram;
    time_t deadline;

    CHECK(boards_register_all(&err));
    ms = hm_machine_new_from_argv(7, argv, &err);
    if (!ms) {
        fprintf(stderr, "machine: %s\n", error_get_pretty(err));
        if (strstr(error_get_pretty(err), "Could not access KVM kernel module") &&
            !(ci && strcmp(ci, "true") == 0)) {
            error_free(err);
            return 77;
        }
        error_free(err);
        return 1;
    }
    ram = memory_region_get_ram_ptr(ms->ram);
    CHECK(ram != NULL);
    CHECK(pthread_create(&thread, NULL, guest_thread, &r) == 0);
    deadline = time(NULL) + 20;
    while (*guest_word(ram, STARTED_GPA) != 1 && time(NULL) < deadline) {
        sched_yield();
    }
    CHECK(*guest_word(ram, STARTED_GPA) == 1);

    /* The machine goes while its vCPU runs; only the VM's slots hold the RAM now. */
    board_machine_free(ms);
    *guest_word(ram, RELEASE_GPA) = 1;
    pthread_join(thread, NULL);
    if (!r.ok) {
        fprintf(stderr, "guest run: %s\n", r.error);
    }
    CHECK(r.ok);
    CHECK(r.ops[3].value == 0x600d);
    if (failures == 0) {
        printf("guest run outlived its machine: ok\n");
    }
    return failures ? 1 : 0;
}
