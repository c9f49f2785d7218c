/* cpattern: a read-only disk whose byte N holds N % 251 (the C example of
 * docs/writing-plugins.md). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "nbdhost-plugin.h"

static int
pattern_create (const struct nbdhost_param *params, size_t n, nbdhost_instance *out)
{
  uint64_t *size = malloc (sizeof *size);
  if (size == NULL)
    return ENOMEM;
  *size = 1 << 20;
  for (size_t i = 0; i < n; i++)
    if (strcmp (params[i].key, "size") == 0) /* already a decimal byte count */
      *size = strtoull (params[i].value, NULL, 10);
  *out = size;
  return 0;
}

static void
pattern_destroy (nbdhost_instance inst)
{
  free (inst);
}

static int
pattern_open (nbdhost_instance inst, const struct nbdhost_open_info *info, nbdhost_handle *out)
{
  (void) info;
  *out = inst; /* nothing per connection: the handle is the size */
  return 0;
}

static int
pattern_get_size (nbdhost_handle h, uint64_t *out)
{
  *out = *(uint64_t *) h;
  return 0;
}

static int
pattern_pread (nbdhost_handle h, uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) h;
  (void) flags;
  for (uint64_t i = 0; i < count; i++)
    buf[i] = (offset + i) % 251;
  return 0;
}

static const struct nbdhost_param_spec params[] = {
  { .name = "size", .kind = NBDHOST_PARAM_SIZE, .default_value = "1M", .help = "disk size" },
};

static const struct nbdhost_plugin_table table = {
  NBDHOST_BACKEND_TABLE_HEADER,
  .thread_model = NBDHOST_THREAD_MODEL_PARALLEL,
  .name = "cpattern",
  .version = "1.0",
  .description = "read-only disk whose byte N holds N % 251",
  .params = params,
  .n_params = 1,
  .create = pattern_create,
  .destroy = pattern_destroy,
  .open = pattern_open,
  .get_size = pattern_get_size,
  .pread = pattern_pread,
};

NBDHOST_EXPORT const void *
nbdhost_plugin_entry (const struct nbdhost_host_api *host)
{
  if (host == NULL || host->abi_major != NBDHOST_ABI_MAJOR)
    return NULL; /* a host of another major version */
  return &table;
}
