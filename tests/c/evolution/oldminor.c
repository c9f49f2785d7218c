/* oldminor: a backend as a plugin built against an OLDER minor version of
 * ABI 1 looks to a newer host.
 *
 * ABI 1.0 is the first version, so there is no real older table; this
 * plugin stands in for one by declaring a struct_size that ends before
 * `zero`, as if zero, extents and cache had been appended in later minors.
 * The fields past struct_size are filled with traps: a host that read
 * past the declared size would call them, log "TRAP" and (for extents)
 * report holes. The host must instead treat them as absent and fall back:
 * zeroing by writing zeros through pwrite, no block status (all data), and
 * FUA emulated with flush (can_fua is absent too, and flush exists).
 *
 * It also reads the host's table the way an older plugin would: through a
 * struct that knows only the fields up to `log` (as if set_error,
 * debug_enabled and last_error were appended later), copying only the
 * prefix it knows.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "nbdhost-plugin.h"

/* The host services as the "older" plugin knows them. */
struct old_host_api {
  uint16_t abi_major;
  uint16_t abi_minor;
  uint32_t struct_size;
  void *ctx;
  void (*log) (void *ctx, uint32_t level, const char *msg, size_t len);
};
static struct old_host_api host;

#define SIZE (1u << 20)
static uint8_t disk[SIZE];

static void say (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));
static void
say (const char *fmt, ...)
{
  char msg[256];
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  if (host.log)
    host.log (host.ctx, NBDHOST_LOG_INFO, msg, strlen (msg));
}

static int
old_create (const struct nbdhost_param *params, size_t n, nbdhost_instance *out)
{
  (void) params;
  (void) n;
  *out = disk;
  return 0;
}

static int
old_open (nbdhost_instance inst, const struct nbdhost_open_info *info, nbdhost_handle *out)
{
  (void) info;
  *out = inst;
  return 0;
}

static int
old_get_size (nbdhost_handle h, uint64_t *out)
{
  (void) h;
  *out = SIZE;
  return 0;
}

static int
old_pread (nbdhost_handle h, uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) h;
  (void) flags;
  memcpy (buf, disk + offset, count);
  return 0;
}

static int
old_pwrite (nbdhost_handle h, const uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags)
{
  uint64_t i;
  int zeros = 1;
  (void) h;
  for (i = 0; i < count && zeros; i++)
    zeros = buf[i] == 0;
  say ("oldminor: pwrite %" PRIu64 " bytes at %" PRIu64 "%s", count, offset, zeros ? " (all zeros)" : "");
  if (flags & NBDHOST_FLAG_FUA)
    say ("TRAP: FUA flag passed to pwrite although can_fua is absent");
  memcpy (disk + offset, buf, count);
  return 0;
}

static int
old_flush (nbdhost_handle h, uint32_t flags)
{
  (void) h;
  (void) flags;
  say ("oldminor: flush");
  return 0;
}

/* Traps: beyond struct_size, never to be called. */
static int
trap_zero (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) h;
  (void) flags;
  say ("TRAP: zero %" PRIu64 " at %" PRIu64 " called beyond struct_size", count, offset);
  memset (disk + offset, 0, count);
  return 0;
}

static int
trap_extents (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags, struct nbdhost_extent_sink *sink)
{
  (void) h;
  (void) flags;
  say ("TRAP: extents %" PRIu64 " at %" PRIu64 " called beyond struct_size", count, offset);
  return sink->add (sink->ctx, offset, count, NBDHOST_EXTENT_HOLE | NBDHOST_EXTENT_ZERO);
}

static int
trap_cache (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) h;
  (void) flags;
  say ("TRAP: cache %" PRIu64 " at %" PRIu64 " called beyond struct_size", count, offset);
  return 0;
}

static const struct nbdhost_plugin_table table = {
  .abi_major = NBDHOST_ABI_MAJOR,
  .abi_minor = 0,
  /* The "older" table ends where `zero` begins. */
  .struct_size = offsetof (struct nbdhost_plugin_table, zero),
  .kind = NBDHOST_PLUGIN_KIND_BACKEND,
  .thread_model = NBDHOST_THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
  .name = "oldminor",
  .version = "0.1-old",
  .description = "a table that ends before zero, extents and cache",
  .create = old_create,
  .open = old_open,
  .get_size = old_get_size,
  .pread = old_pread,
  .pwrite = old_pwrite,
  .flush = old_flush,
  .trim = NULL,
  .zero = trap_zero,
  .extents = trap_extents,
  .cache = trap_cache,
};

NBDHOST_EXPORT const void *
nbdhost_plugin_entry (const struct nbdhost_host_api *h)
{
  if (h == NULL || h->abi_major != NBDHOST_ABI_MAJOR)
    return NULL;
  /* Keep only what this plugin knows of the host's table. */
  nbdhost_copy_prefix (&host, sizeof host, h, h->struct_size);
  say ("oldminor: host ABI %u.%u, table of %u bytes, of which this plugin knows %zu", (unsigned) host.abi_major,
       (unsigned) host.abi_minor, (unsigned) h->struct_size, sizeof host);
  return &table;
}
