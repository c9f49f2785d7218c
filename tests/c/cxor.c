/* cxor: a filter written in C that XORs every byte with a key on its way
 * to and from the layer below (so the layer below stores scrambled data).
 *
 * It shows the filter half of the ABI: the layer below is reached through
 * the struct nbdhost_next_ops given to open; a NULL callback passes the
 * call through unchanged (flush, trim, cache, get_size here); capability
 * callbacks switch off what would expose the scrambled bytes (native
 * zeroing and extents: the host then zeroes by writing through pwrite, and
 * reports every block as data); and an error from below is passed on with
 * the host's message (host->last_error) plus our own context.
 *
 *   gcc -shared -fPIC -Wall -Wextra -Werror -I plugin-api/include \
 *       -o cxor.so tests/c/cxor.c
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nbdhost-plugin.h"

static const struct nbdhost_host_api *host;

struct xor_filter {
  uint8_t key;
};

struct xor_handle {
  uint8_t key;
  const struct nbdhost_next_ops *next;
};

static int
xor_create (const struct nbdhost_param *params, size_t n, nbdhost_instance *out)
{
  long key = 255;
  size_t i;
  struct xor_filter *f;
  for (i = 0; i < n; i++)
    if (strcmp (params[i].key, "key") == 0)
      key = strtol (params[i].value, NULL, 10);
  if (key < 0 || key > 255) {
    nbdhost_set_error (host, "cxor: key must be between 0 and 255");
    return EINVAL;
  }
  f = malloc (sizeof *f);
  if (f == NULL)
    return ENOMEM;
  f->key = (uint8_t) key;
  *out = f;
  return 0;
}

static void
xor_destroy (nbdhost_instance inst)
{
  free (inst);
}

static int
xor_open (nbdhost_instance inst, const struct nbdhost_open_info *info, const struct nbdhost_next_ops *const *children,
          size_t n, nbdhost_handle *out)
{
  struct xor_handle *h;
  (void) info;
  (void) n; /* min_children = max_children = 1: the host checked */
  h = malloc (sizeof *h);
  if (h == NULL)
    return ENOMEM;
  h->key = ((struct xor_filter *) inst)->key;
  h->next = children[0]; /* valid until xor_close returns */
  *out = h;
  return 0;
}

static void
xor_close (nbdhost_handle h)
{
  free (h);
}

static int
xor_no (nbdhost_handle h, uint32_t *out)
{
  (void) h;
  *out = 0;
  return 0;
}

/* Pass an error from the layer below on, with the message it left. */
static int
below_failed (int err, const char *what)
{
  char below[400] = "", msg[512];
  size_t len = 0;
  if (host->last_error)
    len = host->last_error (host->ctx, below, sizeof below - 1);
  below[len < sizeof below ? len : sizeof below - 1] = '\0';
  snprintf (msg, sizeof msg, "cxor: %s below failed: %s", what, below);
  nbdhost_set_error (host, msg);
  return err;
}

static int
xor_pread (nbdhost_handle hp, uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct xor_handle *h = hp;
  uint64_t i;
  int err = h->next->pread (h->next->ctx, buf, count, offset, flags);
  if (err)
    return below_failed (err, "read");
  for (i = 0; i < count; i++)
    buf[i] ^= h->key;
  return 0;
}

static int
xor_pwrite (nbdhost_handle hp, const uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags)
{
  struct xor_handle *h = hp;
  uint64_t i;
  int err;
  uint8_t *copy = malloc (count ? count : 1);
  if (copy == NULL)
    return ENOMEM;
  for (i = 0; i < count; i++)
    copy[i] = buf[i] ^ h->key;
  err = h->next->pwrite (h->next->ctx, copy, count, offset, flags);
  free (copy);
  return err ? below_failed (err, "write") : 0;
}

static const struct nbdhost_param_spec params[] = {
  { .name = "key", .kind = NBDHOST_PARAM_INT, .required = 0, .default_value = "255",
    .help = "byte to XOR the data with (0-255)" },
};

static const struct nbdhost_filter_table table = {
  NBDHOST_FILTER_TABLE_HEADER,
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "cxor",
  .version = "0.9",
  .description = "XOR every byte with a key (C filter)",
  .params = params,
  .n_params = 1,
  .min_children = 1,
  .max_children = 1,
  .child_readonly = 0,
  .create = xor_create,
  .destroy = xor_destroy,
  .open = xor_open,
  .close = xor_close,
  .can_zero = xor_no,
  .can_fast_zero = xor_no,
  .can_extents = xor_no,
  .pread = xor_pread,
  .pwrite = xor_pwrite,
};

NBDHOST_EXPORT const void *
nbdhost_plugin_entry (const struct nbdhost_host_api *h)
{
  if (h == NULL || h->abi_major != NBDHOST_ABI_MAJOR)
    return NULL;
  host = h;
  return &table;
}
