/*
 * Host memory backends from C: each type, each property, each refusal with
 * QEMU 10's wording, the completion order, and the C handle rules.
 * argv[1]: scripts/hugepages-setup.
 */
#include <dirent.h>
#include <stdint.h>
#include <sys/syscall.h>

#include "backend-test.h"

static const char *hugetlbfs_script;

/* get_mempolicy(MPOL_F_ADDR): the policy of the mapping at @addr, no fault. */
static int policy_at(void *addr, unsigned long *mask)
{
    int mode = -1;
    unsigned long m[16] = { 0 };

    if (syscall(SYS_get_mempolicy, &mode, m, 1024UL, addr, 2UL) != 0) {
        return -1;
    }
    *mask = m[0];
    return mode;
}

/* Open file descriptors of this (single-threaded) process. */
static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;

    if (!d) {
        return -1;
    }
    while ((e = readdir(d)) != NULL) {
        n += e->d_name[0] != '.';
    }
    closedir(d);
    return n;
}

static void test_each_type_gives_usable_memory(void)
{
    static const char *const opts[] = {
        "memory-backend-ram,id=ram0,size=4M",
        "memory-backend-memfd,id=fd0,size=4M",
        "memory-backend-file,id=file0,size=4M,mem-path=/tmp",
    };
    static const char *const ids[] = { "ram0", "fd0", "file0" };
    Error *err = NULL;
    size_t i;

    for (i = 0; i < 3; i++) {
        HostMemoryBackend *b = hm_memory_backend_add(opts[i], &err);
        MemoryRegion *mr;
        unsigned char *p;

        EXPECT_OK(&err);
        CHECK(b != NULL);
        if (!b) {
            continue;
        }
        CHECK(hm_memory_backend_find(ids[i]) == b);
        mr = host_memory_backend_get_memory(b);
        CHECK(mr != NULL);
        CHECK(memory_region_size(mr) == 4 * MiB);
        p = memory_region_get_ram_ptr(mr);
        CHECK(p != NULL && p == hm_memory_backend_get_host_ptr(b));
        if (p) {
            p[0] = 1;
            p[4 * MiB - 1] = 2;
            CHECK(p[0] == 1 && p[4 * MiB - 1] == 2);
        }
        CHECK(host_memory_backend_pagesize(b) == 4096);
        CHECK((hm_memory_backend_get_fd(b) >= 0) == (i != 0));
        CHECK(!host_memory_backend_is_mapped(b));
        CHECK(hm_memory_backend_del(ids[i], &err));
        EXPECT_OK(&err);
        CHECK(hm_memory_backend_find(ids[i]) == NULL);
    }
}

struct prop_case {
    const char *type;
    const char *prop;
    const char *value;
    const char *readback;
};

static void test_each_property_round_trips(void)
{
    static const struct prop_case cases[] = {
        { "memory-backend-ram", "size", "1G", "1073741824" },
        { "memory-backend-ram", "merge", "off", "off" },
        { "memory-backend-ram", "dump", "no", "off" },
        { "memory-backend-ram", "prealloc", "yes", "on" },
        { "memory-backend-ram", "prealloc-threads", "4", "4" },
        { "memory-backend-ram", "share", "true", "on" },
        { "memory-backend-ram", "reserve", "on", "on" },
        { "memory-backend-ram", "policy", "bind", "bind" },
        { "memory-backend-ram", "host-nodes", "0-1,3", "0-1,3" },
        { "memory-backend-ram", "x-use-canonical-path-for-ramblock-id", "on", "on" },
        { "memory-backend-file", "mem-path", "/tmp/a,b", "/tmp/a,b" },
        { "memory-backend-file", "align", "2M", "2097152" },
        { "memory-backend-file", "offset", "8K", "8192" },
        { "memory-backend-file", "discard-data", "on", "on" },
        { "memory-backend-file", "readonly", "on", "on" },
        { "memory-backend-file", "rom", "off", "off" },
        { "memory-backend-file", "pmem", "on", "on" },
        { "memory-backend-memfd", "hugetlb", "on", "on" },
        { "memory-backend-memfd", "hugetlbsize", "2M", "2097152" },
        { "memory-backend-memfd", "seal", "off", "off" },
    };
    static const struct prop_case defaults[] = {
        { "memory-backend-ram", "share", NULL, "off" },
        { "memory-backend-ram", "reserve", NULL, "on" },
        { "memory-backend-ram", "merge", NULL, "on" },
        { "memory-backend-ram", "prealloc-threads", NULL, "1" },
        { "memory-backend-file", "rom", NULL, "auto" },
        { "memory-backend-memfd", "share", NULL, "on" },
        { "memory-backend-memfd", "seal", NULL, "on" },
        { "memory-backend-memfd", "hugetlbsize", NULL, "0" },
    };
    Error *err = NULL;
    size_t i;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        HostMemoryBackend *b = hm_memory_backend_new(cases[i].type, "p", &err);
        char *v;

        EXPECT_OK(&err);
        if (!b) {
            continue;
        }
        CHECK(hm_memory_backend_set(b, cases[i].prop, cases[i].value, &err));
        EXPECT_OK(&err);
        v = hm_memory_backend_get(b, cases[i].prop, &err);
        EXPECT_OK(&err);
        if (!v || strcmp(v, cases[i].readback) != 0) {
            fprintf(stderr, "%s.%s: read back '%s', want '%s'\n", cases[i].type,
                    cases[i].prop, v ? v : "(null)", cases[i].readback);
            failures++;
        }
        hm_free(v);
        CHECK(hm_memory_backend_del("p", &err));
        EXPECT_OK(&err);
    }
    for (i = 0; i < sizeof(defaults) / sizeof(defaults[0]); i++) {
        HostMemoryBackend *b = hm_memory_backend_new(defaults[i].type, "d", &err);
        char *v = hm_memory_backend_get(b, defaults[i].prop, &err);

        EXPECT_OK(&err);
        CHECK(v && strcmp(v, defaults[i].readback) == 0);
        hm_free(v);
        CHECK(hm_memory_backend_del("d", &err));
    }
}

struct refusal {
    const char *opts;
    const char *msg;
    HmErrorClass cls;
};

static void test_refusals_from_option_strings(void)
{
    static const struct refusal cases[] = {
        { "memory-backend-ram,id=x,size=0",
          "property 'size' of memory-backend-ram doesn't take value '0'",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=x,size=1M,prealloc=on,reserve=off",
          "'prealloc=on' and 'reserve=off' are incompatible",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=x,size=1M,reserve=off,prealloc=on",
          "'prealloc=on' and 'reserve=off' are incompatible",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=x,size=1M,host-nodes=128,policy=bind",
          "Invalid host-nodes value: 128", HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=x,size=1M,policy=bind",
          "host-nodes must be set for policy bind",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=x,size=1M,host-nodes=0",
          "host-nodes must be empty for policy default, or you should "
          "explicitly specify a policy other than default",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-file,id=x,size=1M",
          "Parameter 'mem-path' is missing", HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-file,id=x,size=1M,mem-path=/nonexistent/x",
          "can't open backing store /nonexistent/x for guest RAM: "
          "No such file or directory", HM_ERROR_CLASS_HOST },
        { "memory-backend-file,id=x,size=1M,mem-path=/tmp,align=3000",
          "alignment 0xbb8 must be multiples of page size 0x1000",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-file,id=x,size=2M,mem-path=/tmp,align=3M",
          "alignment 0x300000 must be a power of two",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-file,id=x,size=1M,mem-path=/tmp,offset=100",
          "offset 0x64 must be multiples of page size 0x1000",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-file,id=x,size=2M,mem-path=/tmp,rom=on",
          "property 'rom' = 'on' is not supported with 'readonly' = 'off'",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-memfd,id=x,size=1M,hugetlbsize=0",
          "Property 'memory-backend-memfd.hugetlbsize' doesn't take value '0'",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=x,size=1M,prealloc-threads=0",
          "property 'prealloc-threads' of memory-backend-ram doesn't take value '0'",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=x,size=1M,foo=1",
          "Invalid parameter 'foo'", HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-foo,id=x,size=1M",
          "Parameter 'qom-type' does not accept value 'memory-backend-foo'",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=dup,size=1M",
          "Duplicate ID 'dup' for object", HM_ERROR_CLASS_DUPLICATE },
        { "memory-backend-ram,id=x,size=abc",
          "Parameter 'size' expects a size value", HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=x,size=1M,merge=maybe",
          "Parameter 'merge' expects 'on' or 'off'", HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=x,size=1M,policy=foo,host-nodes=0",
          "Parameter 'policy' does not accept value 'foo'",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=x,size=1M,host-nodes=3-1,policy=bind",
          "Parameter 'host-nodes' expects a uint64 value or range",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=x,size=1M,prealloc-threads=4294967296",
          "Parameter 'prealloc-threads' expects uint32_t",
          HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=x",
          "Parameter 'size' is missing", HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,size=1M",
          "Parameter 'id' is missing", HM_ERROR_CLASS_INVALID_PARAMETER },
        { "memory-backend-ram,id=x,size=1M,host-nodes=1,policy=bind",
          "cannot bind memory to host NUMA nodes: Invalid argument",
          HM_ERROR_CLASS_HOST },
    };
    Error *err = NULL;
    size_t i;
    FILE *f;
    int fds = count_fds();

    CHECK(hm_memory_backend_add("memory-backend-ram,id=dup,size=1M", &err));
    EXPECT_OK(&err);
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        CHECK(hm_memory_backend_add(cases[i].opts, &err) == NULL);
        CHECK(hm_error_get_class(err) == cases[i].cls);
        EXPECT_ERROR(&err, cases[i].msg);
        /* Nothing half-built stays registered. */
        CHECK(hm_memory_backend_find("x") == NULL);
    }
    CHECK(hm_memory_backend_del("dup", &err));

    /* A file smaller than size + offset. */
    f = fopen("/tmp/hostmem-c-small.img", "w");
    CHECK(f != NULL);
    if (f) {
        char page[4096] = { 0 };
        CHECK(fwrite(page, sizeof(page), 1, f) == 1);
        fclose(f);
    }
    CHECK(!hm_memory_backend_add("memory-backend-file,id=x,size=1M,"
                                 "mem-path=/tmp/hostmem-c-small.img", &err));
    EXPECT_ERROR(&err, "x backing store size 0x1000 is too small for 'size' "
                 "option 0x100000 plus 'offset' option 0x0");
    unlink("/tmp/hostmem-c-small.img");

    /* Memory-size page rules. */
    CHECK(!hm_memory_backend_add("memory-backend-memfd,id=x,size=1000", &err));
    EXPECT_ERROR(&err, "backend 'memory-backend-memfd' memory size must be "
                 "multiple of 4 KiB");
    /* Failed completions closed every descriptor they opened. */
    CHECK(count_fds() == fds);
}

static void test_refusals_step_by_step(void)
{
    static const struct {
        const char *type, *prop, *value, *msg;
    } after[] = {
        { "memory-backend-ram", "size", "2M",
          "cannot change property size of memory-backend-ram " },
        { "memory-backend-ram", "share", "on", "cannot change property value" },
        { "memory-backend-ram", "reserve", "off", "cannot change property value" },
        { "memory-backend-file", "mem-path", "/x",
          "cannot change property 'mem-path' of memory-backend-file" },
        { "memory-backend-file", "align", "8K",
          "cannot change property 'align' of memory-backend-file" },
        { "memory-backend-file", "offset", "8K",
          "cannot change property 'offset' of memory-backend-file" },
        { "memory-backend-file", "readonly", "on",
          "cannot change property 'readonly' of memory-backend-file." },
        { "memory-backend-file", "rom", "on",
          "cannot change property 'rom' of memory-backend-file." },
        { "memory-backend-file", "pmem", "on",
          "cannot change property 'pmem' of memory-backend-file." },
        { "memory-backend-memfd", "hugetlbsize", "2M",
          "cannot change property value" },
    };
    HostMemoryBackend *b;
    Error *err = NULL;
    size_t i;

    for (i = 0; i < sizeof(after) / sizeof(after[0]); i++) {
        b = hm_memory_backend_new(after[i].type, "s", &err);
        EXPECT_OK(&err);
        CHECK(hm_memory_backend_set(b, "size", "1M", &err));
        if (strcmp(after[i].type, "memory-backend-file") == 0) {
            CHECK(hm_memory_backend_set(b, "mem-path", "/tmp", &err));
        }
        CHECK(hm_memory_backend_complete(b, &err));
        EXPECT_OK(&err);
        CHECK(!hm_memory_backend_set(b, after[i].prop, after[i].value, &err));
        CHECK(hm_error_get_class(err) == HM_ERROR_CLASS_COMPLETED);
        EXPECT_ERROR(&err, after[i].msg);
        CHECK(hm_memory_backend_del("s", &err));
    }

    b = hm_memory_backend_new("memory-backend-ram", "s", &err);
    CHECK(!hm_memory_backend_complete(b, &err));
    EXPECT_ERROR(&err, "can't create backend with size 0");
    CHECK(!hm_memory_backend_set(b, "foo", "1", &err));
    EXPECT_ERROR(&err, "Property 'memory-backend-ram.foo' not found");
    CHECK(!hm_memory_backend_set(b, "seal", "on", &err));
    EXPECT_ERROR(&err, "Property 'memory-backend-ram.seal' not found");
    CHECK(hm_memory_backend_get(b, "foo", &err) == NULL);
    EXPECT_ERROR(&err, "Property 'memory-backend-ram.foo' not found");
    CHECK(hm_memory_backend_new("memory-backend-ram", "s", &err) == NULL);
    EXPECT_ERROR(&err, "Duplicate ID 's' for object");
    CHECK(hm_memory_backend_new("memory-backend-xyz", "t", &err) == NULL);
    EXPECT_ERROR(&err, "Parameter 'qom-type' does not accept value 'memory-backend-xyz'");
    CHECK(hm_memory_backend_del("s", &err));

    b = hm_memory_backend_new("memory-backend-file", "s", &err);
    CHECK(hm_memory_backend_set(b, "size", "1M", &err));
    CHECK(!hm_memory_backend_complete(b, &err));
    EXPECT_ERROR(&err, "mem-path property not set");
    CHECK(hm_memory_backend_set(b, "mem-path", "/tmp", &err));
    CHECK(hm_memory_backend_set(b, "readonly", "on", &err));
    CHECK(hm_memory_backend_set(b, "share", "on", &err));
    CHECK(hm_memory_backend_set(b, "rom", "off", &err));
    CHECK(!hm_memory_backend_complete(b, &err));
    EXPECT_ERROR(&err, "property 'rom' = 'off' is incompatible with "
                 "'readonly' = 'on' and 'share' = 'on'");
    CHECK(host_memory_backend_get_memory(b) == NULL);
    CHECK(hm_memory_backend_del("s", &err));

    /* Deletion is refused while mapped, and for unknown ids. */
    b = hm_memory_backend_add("memory-backend-ram,id=u,size=1M", &err);
    host_memory_backend_set_mapped(b, true);
    CHECK(host_memory_backend_is_mapped(b));
    CHECK(!hm_memory_backend_del("u", &err));
    CHECK(hm_error_get_class(err) == HM_ERROR_CLASS_IN_USE);
    EXPECT_ERROR(&err, "object 'u' is in use, can not be deleted");
    host_memory_backend_set_mapped(b, false);
    CHECK(hm_memory_backend_del("u", &err));
    CHECK(!hm_memory_backend_del("u", &err));
    EXPECT_ERROR(&err, "object 'u' not found");

    /* NULL arguments are errors, not crashes. */
    CHECK(hm_memory_backend_add(NULL, &err) == NULL);
    EXPECT_ERROR(&err, "Parameter 'opts' is missing");
    CHECK(!hm_memory_backend_set(NULL, "size", "1M", &err));
    EXPECT_ERROR(&err, "Parameter 'b' is missing");
    CHECK(hm_memory_backend_find(NULL) == NULL);
    CHECK(host_memory_backend_get_memory(NULL) == NULL);
    CHECK(!hm_memory_backend_del(NULL, &err));
    EXPECT_ERROR(&err, "Parameter 'id' is missing");
}

struct order_probe {
    HostMemoryBackend *b;
    size_t len;
    int calls;
    int resident_at_start;
    int policy_at_start;
    unsigned long mask_at_start;
    uint64_t last_done;
};

static void probe_progress(uint64_t done, uint64_t total, void *opaque)
{
    struct order_probe *p = opaque;

    (void)total;
    if (p->calls++ == 0) {
        /* Before any page is touched: policy installed, nothing resident. */
        void *ptr = hm_memory_backend_get_host_ptr(p->b);

        p->resident_at_start = (int)resident_pages(ptr, p->len);
        p->policy_at_start = policy_at(ptr, &p->mask_at_start);
    }
    p->last_done = done;
}

static void test_bind_comes_before_any_page_is_touched(void)
{
    struct order_probe probe = { .len = 64 * MiB };
    Error *err = NULL;
    char *trace;
    void *ptr;

    probe.b = hm_memory_backend_new("memory-backend-ram", "numa0", &err);
    CHECK(hm_memory_backend_set(probe.b, "size", "64M", &err));
    CHECK(hm_memory_backend_set(probe.b, "host-nodes", "0", &err));
    CHECK(hm_memory_backend_set(probe.b, "policy", "bind", &err));
    CHECK(hm_memory_backend_set(probe.b, "prealloc", "on", &err));
    CHECK(hm_memory_backend_set(probe.b, "prealloc-threads", "2", &err));
    CHECK(hm_memory_backend_set_prealloc_progress(probe.b, probe_progress, &probe, &err));
    CHECK(hm_memory_backend_complete(probe.b, &err));
    EXPECT_OK(&err);
    CHECK(probe.calls >= 2);
    CHECK(probe.resident_at_start == 0);
    CHECK(probe.policy_at_start == 2); /* MPOL_BIND */
    CHECK(probe.mask_at_start == 1);
    CHECK(probe.last_done == 64 * MiB);
    ptr = hm_memory_backend_get_host_ptr(probe.b);
    CHECK(resident_pages(ptr, 64 * MiB) == 64 * MiB / 4096);
    trace = hm_memory_backend_trace(probe.b, &err);
    CHECK(trace && strcmp(trace, "allocate,hugepage,dontfork,mergeable,bind,prealloc") == 0);
    hm_free(trace);
    CHECK(hm_memory_backend_del("numa0", &err));
    EXPECT_OK(&err);
}

static void test_late_changes(void)
{
    Error *err = NULL;
    HostMemoryBackend *b = hm_memory_backend_add(
        "memory-backend-memfd,id=late,size=8M,share=off,seal=off", &err);
    void *ptr = hm_memory_backend_get_host_ptr(b);
    char *trace;

    EXPECT_OK(&err);
    CHECK(resident_pages(ptr, 8 * MiB) == 0);
    CHECK(hm_memory_backend_set(b, "merge", "off", &err));
    CHECK(hm_memory_backend_set(b, "dump", "off", &err));
    CHECK(hm_memory_backend_set(b, "prealloc", "on", &err));
    EXPECT_OK(&err);
    CHECK(resident_pages(ptr, 8 * MiB) == 8 * MiB / 4096);
    trace = hm_memory_backend_trace(b, &err);
    CHECK(trace && strcmp(trace, "allocate,hugepage,dontfork,mergeable,"
                          "unmergeable,dontdump,prealloc") == 0);
    hm_free(trace);
    CHECK(hm_memory_backend_del("late", &err));

    /*
     * reserve=off: a sparse mapping larger than the test could ever fault in
     * (8 GiB: valgrind's address space is too small for the Rust tests' 1 TiB).
     */
    b = hm_memory_backend_add("memory-backend-ram,id=sparse,size=8G,reserve=off", &err);
    EXPECT_OK(&err);
    CHECK(b && memory_region_size(host_memory_backend_get_memory(b)) == 8 * GiB);
    CHECK(b && resident_pages(hm_memory_backend_get_host_ptr(b), 8 * GiB) == 0);
    CHECK(hm_memory_backend_del("sparse", &err));
    EXPECT_OK(&err);
}

static void test_hugetlbfs_small(void)
{
    char dir[256], opts[512];
    Error *err = NULL;
    HostMemoryBackend *b;

    if (!hugetlbfs_path(hugetlbfs_script, dir, sizeof(dir))) {
        return;
    }
    snprintf(opts, sizeof(opts),
             "memory-backend-file,id=hp,size=1M,mem-path=%s", dir);
    CHECK(!hm_memory_backend_add(opts, &err));
    EXPECT_ERROR(&err, "memory size 0x100000 must be equal to or larger than "
                 "page size 0x200000");
    snprintf(opts, sizeof(opts),
             "memory-backend-file,id=hp,size=4M,mem-path=%s,align=1M", dir);
    CHECK(!hm_memory_backend_add(opts, &err));
    EXPECT_ERROR(&err, "alignment 0x100000 must be multiples of page size 0x200000");
    snprintf(opts, sizeof(opts),
             "memory-backend-file,id=hp,size=4M,mem-path=%s,prealloc=on", dir);
    b = hm_memory_backend_add(opts, &err);
    EXPECT_OK(&err);
    CHECK(b && host_memory_backend_pagesize(b) == 2 * MiB);
    CHECK(b && resident_pages(hm_memory_backend_get_host_ptr(b), 4 * MiB) == 1024);
    CHECK(hm_memory_backend_del("hp", &err));

    b = hm_memory_backend_add("memory-backend-memfd,id=hm,size=4M,hugetlb=on,"
                              "hugetlbsize=2M,prealloc=on", &err);
    EXPECT_OK(&err);
    CHECK(b && host_memory_backend_pagesize(b) == 2 * MiB);
    CHECK(hm_memory_backend_del("hm", &err));
    CHECK(!hm_memory_backend_add("memory-backend-memfd,id=hm,size=2M,hugetlb=on,"
                                 "hugetlbsize=3M", &err));
    EXPECT_ERROR(&err, "Hugepage size must be a power of 2");
}

int main(int argc, char **argv)
{
    hugetlbfs_script = argc > 1 ? argv[1] : NULL;
    test_each_type_gives_usable_memory();
    test_each_property_round_trips();
    test_refusals_from_option_strings();
    test_refusals_step_by_step();
    test_bind_comes_before_any_page_is_touched();
    test_late_changes();
    test_hugetlbfs_small();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("backend: all checks passed\n");
    return 0;
}
