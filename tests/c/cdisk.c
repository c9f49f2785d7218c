/* cdisk: an in-memory disk written in C against nbdhost-plugin.h.
 *
 * A complete backend: parameters, per-export state shared by every
 * connection (so multi-conn is safe), pread/pwrite/flush/trim/zero/extents
 * with a 4 KiB allocation map, native FUA, host logging with the export
 * name and peer, debug output, and error messages for the client.
 *
 *   gcc -shared -fPIC -Wall -Wextra -Werror -I plugin-api/include \
 *       -o cdisk.so tests/c/cdisk.c -lpthread
 *
 * Parameters: size (default 1M, at most 1G); fail_at: reads touching the
 * 512 bytes at this offset fail with EIO and a message (for tests).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nbdhost-plugin.h"

#define PAGE 4096

static const struct nbdhost_host_api *host;

struct disk {
  uint64_t size;
  uint64_t fail_at; /* UINT64_MAX: never */
  uint8_t *data;
  uint8_t *allocated; /* one byte per page */
  pthread_mutex_t lock;
  unsigned long flushes;
};

static void
logf_ (uint32_t level, const char *fmt, ...) __attribute__ ((format (printf, 2, 3)));
static void
logf_ (uint32_t level, const char *fmt, ...)
{
  char msg[512];
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  nbdhost_log (host, level, msg);
}

static int
fail (int err, const char *fmt, ...) __attribute__ ((format (printf, 2, 3)));
static int
fail (int err, const char *fmt, ...)
{
  char msg[512];
  va_list ap;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  nbdhost_set_error (host, msg);
  return err;
}

static int
disk_create (const struct nbdhost_param *params, size_t n, nbdhost_instance *out)
{
  uint64_t size = 1 << 20, fail_at = UINT64_MAX;
  size_t i;
  struct disk *d;

  /* The host has validated and normalised every value: sizes arrive as
   * decimal byte counts, unknown keys never arrive. */
  for (i = 0; i < n; i++) {
    if (strcmp (params[i].key, "size") == 0)
      size = strtoull (params[i].value, NULL, 10);
    else if (strcmp (params[i].key, "fail_at") == 0)
      fail_at = strtoull (params[i].value, NULL, 10);
  }
  if (size == 0 || size > (UINT64_C (1) << 30))
    return fail (EINVAL, "cdisk: size must be between 1 byte and 1 GiB, not %" PRIu64, size);

  d = calloc (1, sizeof *d);
  if (d == NULL)
    return fail (ENOMEM, "cdisk: out of memory");
  d->size = size;
  d->fail_at = fail_at;
  d->data = calloc (1, size);
  d->allocated = calloc (1, (size + PAGE - 1) / PAGE);
  if (d->data == NULL || d->allocated == NULL) {
    free (d->data);
    free (d->allocated);
    free (d);
    return fail (ENOMEM, "cdisk: cannot allocate %" PRIu64 " bytes", size);
  }
  pthread_mutex_init (&d->lock, NULL);
  *out = d;
  return 0;
}

static void
disk_destroy (nbdhost_instance inst)
{
  struct disk *d = inst;
  logf_ (NBDHOST_LOG_INFO, "destroy after %lu flushes", d->flushes);
  pthread_mutex_destroy (&d->lock);
  free (d->data);
  free (d->allocated);
  free (d);
}

static int
disk_open (nbdhost_instance inst, const struct nbdhost_open_info *info, nbdhost_handle *out)
{
  logf_ (NBDHOST_LOG_INFO, "open export `%.*s` for %.*s (%s)", (int) info->export_name_len, info->export_name,
         (int) info->peer_len, info->peer, info->readonly ? "read-only" : "read-write");
  if (nbdhost_debug_enabled (host))
    logf_ (NBDHOST_LOG_DEBUG, "handle %p opened", inst);
  /* Every connection shares the export's disk: the handle is the disk. */
  *out = inst;
  return 0;
}

static int
disk_get_size (nbdhost_handle h, uint64_t *out)
{
  *out = ((struct disk *) h)->size;
  return 0;
}

static int
disk_can_multi_conn (nbdhost_handle h, uint32_t *out)
{
  (void) h;
  *out = 1;
  return 0;
}

static int
disk_can_fua (nbdhost_handle h, uint32_t *out)
{
  (void) h;
  *out = NBDHOST_SUPPORT_NATIVE; /* RAM: every write is as durable as it gets */
  return 0;
}

static int
disk_pread (nbdhost_handle h, uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct disk *d = h;
  (void) flags;
  /* The host has checked the range against the size. */
  if (d->fail_at != UINT64_MAX && offset < d->fail_at + 512 && d->fail_at < offset + count)
    return fail (EIO, "cdisk: injected read error at offset %" PRIu64, d->fail_at);
  pthread_mutex_lock (&d->lock);
  memcpy (buf, d->data + offset, count);
  pthread_mutex_unlock (&d->lock);
  return 0;
}

static int
disk_pwrite (nbdhost_handle h, const uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct disk *d = h;
  uint64_t p;
  (void) flags; /* NBDHOST_FLAG_FUA: nothing more to do in RAM */
  pthread_mutex_lock (&d->lock);
  memcpy (d->data + offset, buf, count);
  for (p = offset / PAGE; p * PAGE < offset + count; p++)
    d->allocated[p] = 1;
  pthread_mutex_unlock (&d->lock);
  return 0;
}

static int
disk_flush (nbdhost_handle h, uint32_t flags)
{
  struct disk *d = h;
  unsigned long n;
  (void) flags;
  pthread_mutex_lock (&d->lock);
  n = ++d->flushes;
  pthread_mutex_unlock (&d->lock);
  if (nbdhost_debug_enabled (host))
    logf_ (NBDHOST_LOG_DEBUG, "flush #%lu", n);
  return 0;
}

/* Zero a range; pages it covers entirely are deallocated. */
static int
disk_zero (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct disk *d = h;
  uint64_t p;
  (void) flags; /* zeroing is always fast here, so FAST_ZERO needs nothing */
  pthread_mutex_lock (&d->lock);
  memset (d->data + offset, 0, count);
  for (p = (offset + PAGE - 1) / PAGE; (p + 1) * PAGE <= offset + count; p++)
    d->allocated[p] = 0;
  if (offset + count == d->size && d->size % PAGE != 0 && offset <= d->size / PAGE * PAGE)
    d->allocated[d->size / PAGE] = 0; /* the short last page */
  pthread_mutex_unlock (&d->lock);
  return 0;
}

static int
disk_trim (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags)
{
  return disk_zero (h, count, offset, flags);
}

static int
disk_extents (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags, struct nbdhost_extent_sink *sink)
{
  struct disk *d = h;
  uint64_t pos = offset, end = offset + count;
  int err = 0;
  pthread_mutex_lock (&d->lock);
  while (pos < end && err == 0) {
    uint8_t a = d->allocated[pos / PAGE];
    uint64_t run = pos;
    while (run < end && d->allocated[run / PAGE] == a)
      run = (run / PAGE + 1) * PAGE;
    if (run > end)
      run = end;
    err = sink->add (sink->ctx, pos, run - pos, a ? 0 : NBDHOST_EXTENT_HOLE | NBDHOST_EXTENT_ZERO);
    pos = run;
    if (flags & NBDHOST_FLAG_REQ_ONE)
      break;
  }
  pthread_mutex_unlock (&d->lock);
  return err;
}

static const struct nbdhost_param_spec params[] = {
  { .name = "size", .kind = NBDHOST_PARAM_SIZE, .required = 0, .default_value = "1M", .help = "disk size (at most 1G)" },
  { .name = "fail_at", .kind = NBDHOST_PARAM_SIZE, .required = 0, .default_value = NULL,
    .help = "reads of the 512 bytes at this offset fail with EIO" },
};

static const struct nbdhost_plugin_table table = {
  NBDHOST_BACKEND_TABLE_HEADER,
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "cdisk",
  .version = "1.2.3",
  .description = "in-memory disk written in C",
  .params = params,
  .n_params = sizeof params / sizeof params[0],
  .create = disk_create,
  .destroy = disk_destroy,
  .open = disk_open,
  /* no close: the handle is the shared disk */
  .get_size = disk_get_size,
  .can_fua = disk_can_fua,
  .can_multi_conn = disk_can_multi_conn,
  .pread = disk_pread,
  .pwrite = disk_pwrite,
  .flush = disk_flush,
  .trim = disk_trim,
  .zero = disk_zero,
  .extents = disk_extents,
};

NBDHOST_EXPORT const void *
nbdhost_plugin_entry (const struct nbdhost_host_api *h)
{
  if (h == NULL || h->abi_major != NBDHOST_ABI_MAJOR)
    return NULL;
  host = h;
  return &table;
}
