/*
 * 1 GiB anonymous, memfd and hugetlbfs (2 MiB pages) backends preallocated
 * with prealloc-threads=2: nothing resident before preallocation starts,
 * every page resident afterwards. argv[1]: scripts/hugepages-setup.
 */
#include <stdint.h>

#include "backend-test.h"

struct seen {
    HostMemoryBackend *b;
    uint64_t size;
    int calls;
    size_t resident_at_start;
    uint64_t last_done;
};

static void progress(uint64_t done, uint64_t total, void *opaque)
{
    struct seen *s = opaque;

    if (s->calls++ == 0) {
        s->resident_at_start = resident_pages(hm_memory_backend_get_host_ptr(s->b),
                                              s->size);
    }
    CHECK(total == s->size);
    CHECK(done >= s->last_done);
    s->last_done = done;
}

static void prealloc_one(const char *type, const char *mem_path, size_t page_size)
{
    struct seen s = { .size = GiB };
    Error *err = NULL;
    void *ptr;
    char *trace;

    s.b = hm_memory_backend_new(type, "big", &err);
    EXPECT_OK(&err);
    if (!s.b) {
        return;
    }
    CHECK(hm_memory_backend_set(s.b, "size", "1G", &err));
    if (mem_path) {
        CHECK(hm_memory_backend_set(s.b, "mem-path", mem_path, &err));
    }
    CHECK(hm_memory_backend_set(s.b, "prealloc", "on", &err));
    CHECK(hm_memory_backend_set(s.b, "prealloc-threads", "2", &err));
    CHECK(hm_memory_backend_set_prealloc_progress(s.b, progress, &s, &err));
    CHECK(hm_memory_backend_complete(s.b, &err));
    EXPECT_OK(&err);
    ptr = hm_memory_backend_get_host_ptr(s.b);
    CHECK(s.calls >= 2);
    CHECK(s.resident_at_start == 0);
    CHECK(s.last_done == GiB);
    CHECK(host_memory_backend_pagesize(s.b) == page_size);
    CHECK(resident_pages(ptr, GiB) == GiB / 4096);
    trace = hm_memory_backend_trace(s.b, &err);
    CHECK(trace && strstr(trace, "prealloc") != NULL);
    hm_free(trace);
    printf("%s: 1 GiB preallocated, %zu pages resident (%d progress reports)\n",
           type, resident_pages(ptr, GiB), s.calls);
    CHECK(hm_memory_backend_del("big", &err));
    EXPECT_OK(&err);
}

int main(int argc, char **argv)
{
    char dir[256];

    prealloc_one("memory-backend-ram", NULL, 4096);
    prealloc_one("memory-backend-memfd", NULL, 4096);
    if (hugetlbfs_path(argc > 1 ? argv[1] : NULL, dir, sizeof(dir))) {
        prealloc_one("memory-backend-file", dir, 2 * MiB);
    }
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    return 0;
}
