/* newminor: a backend built against a NEWER minor version of ABI 1 than
 * the host's.
 *
 * Its table is ABI 1.0's with two fields appended (as a hypothetical 1.7
 * would append them) and says so in abi_minor and struct_size. The host
 * must load it, use the fields it knows, and ignore the rest: the extra
 * callback is a trap that logs "TRAP" if ever called.
 *
 * It also looks for a host service from that newer minor with
 * NBDHOST_HAS_FIELD, finds the host's table too short, and falls back
 * (logging that it did) instead of reading past the host's struct_size.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "nbdhost-plugin.h"

/* What a 1.7 header might declare. */
struct newer_plugin_table {
  struct nbdhost_plugin_table v1_0;
  int (*frobnicate) (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags);
  uint64_t future_flags;
};
struct newer_host_api {
  struct nbdhost_host_api v1_0;
  void (*future_service) (void *ctx, const char *what);
};

static const struct nbdhost_host_api *host;

#define SIZE (2u << 20)
static uint8_t disk[SIZE];

static int
new_create (const struct nbdhost_param *params, size_t n, nbdhost_instance *out)
{
  (void) params;
  (void) n;
  *out = disk;
  return 0;
}

static int
new_open (nbdhost_instance inst, const struct nbdhost_open_info *info, nbdhost_handle *out)
{
  (void) info;
  *out = inst;
  return 0;
}

static int
new_get_size (nbdhost_handle h, uint64_t *out)
{
  (void) h;
  *out = SIZE;
  return 0;
}

static int
new_pread (nbdhost_handle h, uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) h;
  (void) flags;
  memcpy (buf, disk + offset, count);
  return 0;
}

static int
new_pwrite (nbdhost_handle h, const uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) h;
  (void) flags;
  memcpy (disk + offset, buf, count);
  return 0;
}

static int
trap_frobnicate (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) h;
  (void) count;
  (void) offset;
  (void) flags;
  nbdhost_log (host, NBDHOST_LOG_ERROR, "TRAP: frobnicate (a 1.7 field) was called");
  return EIO;
}

static const struct newer_plugin_table table = {
  .v1_0 = {
    .abi_major = NBDHOST_ABI_MAJOR,
    .abi_minor = 7,
    .struct_size = sizeof (struct newer_plugin_table),
    .kind = NBDHOST_PLUGIN_KIND_BACKEND,
    .thread_model = NBDHOST_THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    .name = "newminor",
    .version = "1.7.0",
    .description = "a table with fields from a future minor",
    .create = new_create,
    .open = new_open,
    .get_size = new_get_size,
    .pread = new_pread,
    .pwrite = new_pwrite,
  },
  .frobnicate = trap_frobnicate,
  .future_flags = UINT64_MAX,
};

NBDHOST_EXPORT const void *
nbdhost_plugin_entry (const struct nbdhost_host_api *h)
{
  char msg[200];
  if (h == NULL || h->abi_major != NBDHOST_ABI_MAJOR)
    return NULL;
  host = h;
  if (NBDHOST_HAS_FIELD (h, struct newer_host_api, future_service)) {
    ((const struct newer_host_api *) h)->future_service (h->ctx, "newminor");
  } else {
    snprintf (msg, sizeof msg,
              "newminor: host ABI %u.%u has no future_service (its table is %u bytes, the field ends at %zu): "
              "falling back",
              (unsigned) h->abi_major, (unsigned) h->abi_minor, (unsigned) h->struct_size,
              offsetof (struct newer_host_api, future_service) + sizeof (void (*) (void)));
    nbdhost_log (host, NBDHOST_LOG_INFO, msg);
  }
  return &table;
}
