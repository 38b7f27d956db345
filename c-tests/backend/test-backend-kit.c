/*
 * What a VMM that is not QEMU-shaped uses: typed constructors (numbers, paths as they are,
 * an optional id), freeing by handle, pins on the memory, host address lookup, and one
 * backend laid over a guest address map with a hole. Every refusal names its culprit and
 * leaves nothing behind.
 */
#include <limits.h>
#include <sys/stat.h>

#include "backend-test.h"

static void typed_constructors(void)
{
    Error *err = NULL;
    HmBackendConfig ram = { .kind = HM_BACKEND_KIND_RAM, .size = 8 * MiB };
    HostMemoryBackend *a, *b, *f;
    char dir[] = "/tmp/hm-kit-XXXXXX", path[PATH_MAX];
    struct stat st;
    char *v;

    a = hm_memory_backend_create(&ram, &err);
    EXPECT_OK(&err);
    b = hm_memory_backend_create(&ram, &err);
    EXPECT_OK(&err);
    /* No id: the first free hm-memN. */
    CHECK(a && a == hm_memory_backend_find("hm-mem0"));
    CHECK(b && b == hm_memory_backend_find("hm-mem1"));
    v = hm_memory_backend_get(a, "size", &err);
    EXPECT_OK(&err);
    CHECK(v && strcmp(v, "8388608") == 0);
    hm_free(v);
    CHECK(hm_memory_backend_free(a, &err));
    EXPECT_OK(&err);
    CHECK(!hm_memory_backend_find("hm-mem0"));
    CHECK(hm_memory_backend_free(b, &err));
    EXPECT_OK(&err);

    /* A path with commas, as is: the option syntax would need them doubled. */
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/guest,ram", dir);
    {
        HmBackendConfig file = { .kind = HM_BACKEND_KIND_FILE, .id = "file0", .size = 4 * MiB,
                                 .mem_path = path, .flags = HM_BACKEND_SHARE | HM_BACKEND_PREALLOC };
        f = hm_memory_backend_create(&file, &err);
        EXPECT_OK(&err);
    }
    CHECK(f && stat(path, &st) == 0 && st.st_size == (off_t)(4 * MiB));
    CHECK(f && ((uintptr_t)hm_memory_backend_get_host_ptr(f) & (2 * MiB - 1)) == 0);
    v = f ? hm_memory_backend_get(f, "share", &err) : NULL;
    EXPECT_OK(&err);
    CHECK(v && strcmp(v, "on") == 0);
    hm_free(v);
    CHECK(f && resident_pages(hm_memory_backend_get_host_ptr(f), 4 * MiB) == 4 * MiB / 4096);
    CHECK(hm_memory_backend_free(f, &err));
    EXPECT_OK(&err);
    /* Freed means gone: the stale handle says so. */
    CHECK(!hm_memory_backend_free(f, &err));
    EXPECT_ERROR(&err, "memory backend no longer exists");
    unlink(path);
    rmdir(dir);

    /* Refusals: nothing of them stays in /objects. */
    {
        HmBackendConfig both = { .kind = HM_BACKEND_KIND_RAM, .id = "bad0", .size = MiB,
                                 .flags = HM_BACKEND_SHARE | HM_BACKEND_PRIVATE };
        HmBackendConfig nopath = { .kind = HM_BACKEND_KIND_FILE, .id = "bad1", .size = MiB };
        HmBackendConfig zero = { .kind = HM_BACKEND_KIND_RAM, .id = "bad2" };
        HmBackendConfig unknown = { .kind = HM_BACKEND_KIND_RAM, .id = "bad3", .size = MiB,
                                    .flags = 1u << 20 };
        HmBackendConfig missing = { .kind = HM_BACKEND_KIND_FILE, .id = "bad4", .size = MiB,
                                    .mem_path = "/nonexistent/dir/ram" };
        HmBackendConfig prealloc_noreserve = { .kind = HM_BACKEND_KIND_RAM, .id = "bad5",
                                               .size = MiB,
                                               .flags = HM_BACKEND_PREALLOC | HM_BACKEND_NORESERVE };

        CHECK(!hm_memory_backend_create(&both, &err));
        EXPECT_ERROR(&err, "Parameter 'flags' asks for both HM_BACKEND_SHARE and HM_BACKEND_PRIVATE");
        CHECK(!hm_memory_backend_create(&nopath, &err));
        EXPECT_ERROR(&err, "Parameter 'mem_path' is missing");
        CHECK(!hm_memory_backend_create(&zero, &err));
        EXPECT_ERROR(&err, "property 'size' of memory-backend-ram doesn't take value '0'");
        CHECK(!hm_memory_backend_create(&unknown, &err));
        EXPECT_ERROR(&err, "Parameter 'flags' has unknown bits 0x100000");
        CHECK(!hm_memory_backend_create(&missing, &err));
        EXPECT_ERROR(&err, "can't open backing store /nonexistent/dir/ram for guest RAM: No such file or directory");
        CHECK(!hm_memory_backend_create(&prealloc_noreserve, &err));
        EXPECT_ERROR(&err, "'prealloc=on' and 'reserve=off' are incompatible");
        CHECK(!hm_memory_backend_create(NULL, &err));
        EXPECT_ERROR(&err, "Parameter 'cfg' is missing");
        for (int i = 0; i <= 5; i++) {
            char id[8];

            snprintf(id, sizeof(id), "bad%d", i);
            CHECK(!hm_memory_backend_find(id));
        }
    }
}

/* A hugetlb pool too small is said before mapping, in pages, with its own error class. */
static void hugetlb_pool_too_small(void)
{
    Error *err = NULL;
    unsigned long long free_pages = 0;
    FILE *f = fopen("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "r");
    HmBackendConfig cfg = { .kind = HM_BACKEND_KIND_MEMFD, .id = "huge", .flags = HM_BACKEND_HUGETLB,
                            .hugetlbsize = 2 * MiB };
    const char *want = "hugetlbfs pool too small for guest RAM 'huge': ";

    if (!f) {
        printf("no 2 MiB hugetlb pool on this host: pool check not exercised\n");
        return;
    }
    CHECK(fscanf(f, "%llu", &free_pages) == 1);
    fclose(f);
    /* More than the pool holds, even if other tests free pages meanwhile. */
    cfg.size = (free_pages + 4096) * 2 * MiB;
    CHECK(!hm_memory_backend_create(&cfg, &err));
    CHECK(err && strncmp(error_get_pretty(err), want, strlen(want)) == 0);
    CHECK(err && strstr(error_get_pretty(err), " pages of 2 MiB needed, "));
    CHECK(err && hm_error_get_class(err) == HM_ERROR_CLASS_HOST_RESOURCES);
    CHECK(err && hm_error_get_hint(err) && strstr(hm_error_get_hint(err), "reserve=off"));
    if (err) {
        error_free(err);
        err = NULL;
    }
    CHECK(!hm_memory_backend_find("huge"));
}

static void pins_and_lookup(void)
{
    Error *err = NULL;
    HmBackendConfig cfg = { .kind = HM_BACKEND_KIND_MEMFD, .id = "pinned", .size = 2 * MiB };
    HostMemoryBackend *b = hm_memory_backend_create(&cfg, &err), *found;
    HmMemoryPin *pin, *pin2;
    uint64_t off = 0;
    char *host;
    int local;

    EXPECT_OK(&err);
    if (!b) {
        return;
    }
    host = hm_memory_backend_get_host_ptr(b);
    /* memfd starts on a 2 MiB boundary, as anonymous RAM does, so KVM can use huge pages. */
    CHECK(((uintptr_t)host & (2 * MiB - 1)) == 0);
    pin = hm_memory_pin(b, &err);
    EXPECT_OK(&err);
    pin2 = hm_memory_pin(b, &err);
    EXPECT_OK(&err);
    CHECK(pin && hm_memory_pin_host_ptr(pin) == host && hm_memory_pin_size(pin) == 2 * MiB);

    found = hm_memory_backend_from_host(host + 12345, &off);
    CHECK(found == b && off == 12345);
    CHECK(hm_memory_backend_from_host(host + 2 * MiB, &off) == NULL);
    CHECK(hm_memory_backend_from_host(&local, NULL) == NULL);

    CHECK(!hm_memory_backend_del("pinned", &err));
    EXPECT_ERROR(&err, "object 'pinned' is in use, can not be deleted: the VMM holds 2 pin(s) on its memory");
    CHECK(!hm_memory_backend_free(b, &err));
    EXPECT_ERROR(&err, "object 'pinned' is in use, can not be deleted: the VMM holds 2 pin(s) on its memory");
    hm_memory_pin_release(pin);
    CHECK(!hm_memory_backend_free(b, &err));
    EXPECT_ERROR(&err, "object 'pinned' is in use, can not be deleted: the VMM holds 1 pin(s) on its memory");
    hm_memory_pin_release(pin2);
    hm_memory_pin_release(NULL);
    CHECK(hm_memory_backend_free(b, &err));
    EXPECT_OK(&err);

    /* Not complete yet: nothing to pin. */
    b = hm_memory_backend_new("memory-backend-ram", "raw", &err);
    EXPECT_OK(&err);
    CHECK(!hm_memory_pin(b, &err));
    EXPECT_ERROR(&err, "memory backend 'raw' has no memory yet: complete it first");
    CHECK(hm_memory_backend_free(b, &err));
    EXPECT_OK(&err);
}

static void layout_over_a_hole(void)
{
    Error *err = NULL;
    /* 6 GiB, never touched: reserve=off costs nothing. */
    HmBackendConfig cfg = { .kind = HM_BACKEND_KIND_RAM, .id = "big", .size = 6 * GiB,
                            .flags = HM_BACKEND_NORESERVE };
    HostMemoryBackend *b = hm_memory_backend_create(&cfg, &err);
    HmGpaHole pci = { .start = 3 * GiB, .size = GiB };
    HmGpaHole overlapping[] = { { .start = GiB, .size = 2 * GiB }, { .start = 2 * GiB, .size = GiB } };
    HmRamRange r[4];
    char *host;
    ptrdiff_t n;

    EXPECT_OK(&err);
    if (!b) {
        return;
    }
    host = hm_memory_backend_get_host_ptr(b);
    n = hm_memory_backend_lay_out(b, 0, &pci, 1, r, 4, &err);
    EXPECT_OK(&err);
    CHECK(n == 2);
    CHECK(r[0].gpa == 0 && r[0].offset == 0 && r[0].size == 3 * GiB && r[0].host == host);
    CHECK(r[1].gpa == 4 * GiB && r[1].offset == 3 * GiB && r[1].size == 3 * GiB &&
          r[1].host == host + 3 * GiB);
    /* Too little room: the count tells how much is needed; what fits is written. */
    memset(r, 0, sizeof(r));
    n = hm_memory_backend_lay_out(b, 0, &pci, 1, r, 1, &err);
    EXPECT_OK(&err);
    CHECK(n == 2 && r[0].size == 3 * GiB && r[1].size == 0);
    CHECK(hm_memory_backend_lay_out(b, 0, &pci, 1, NULL, 0, &err) == 2);
    EXPECT_OK(&err);
    CHECK(hm_memory_backend_lay_out(b, 0, overlapping, 2, r, 4, &err) == -1);
    EXPECT_ERROR(&err, "holes at 0x40000000 and 0x80000000 overlap");
    CHECK(hm_memory_backend_lay_out(b, 4096 + 1, NULL, 0, r, 4, &err) == -1);
    EXPECT_ERROR(&err, "RAM base 0x1001 is not a multiple of 0x1000");
    CHECK(hm_memory_backend_free(b, &err));
    EXPECT_OK(&err);
}

int main(void)
{
    typed_constructors();
    hugetlb_pool_too_small();
    pins_and_lookup();
    layout_over_a_hole();
    expect_no_pending("kit");
    if (failures) {
        fprintf(stderr, "%d failure(s)\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
