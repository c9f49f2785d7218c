/* broken: plugins the host must refuse, each with a clear message naming
 * the file. Built once per case with -DCASE_<NAME>:
 *
 *   BAD_MAJOR     a table built for ABI 2.0
 *   NULL_TABLE    the entry point refuses the host (returns NULL)
 *   TINY_TABLE    struct_size smaller than the fixed header
 *   BAD_KIND      a kind this host does not know
 *   NO_ENTRY      no nbdhost_plugin_entry symbol at all
 *   NO_PREAD      a backend without a required callback
 *   BAD_CHILDREN  a filter declaring min_children > max_children
 */
#include <stddef.h>
#include <string.h>

#include "nbdhost-plugin.h"

/* Not every case uses every piece. */
#define MAYBE_UNUSED __attribute__ ((unused))

MAYBE_UNUSED static int
b_create (const struct nbdhost_param *params, size_t n, nbdhost_instance *out)
{
  (void) params;
  (void) n;
  *out = NULL;
  return 0;
}

MAYBE_UNUSED static int
b_open (nbdhost_instance inst, const struct nbdhost_open_info *info, nbdhost_handle *out)
{
  (void) info;
  *out = inst;
  return 0;
}

MAYBE_UNUSED static int
b_get_size (nbdhost_handle h, uint64_t *out)
{
  (void) h;
  *out = 1 << 20;
  return 0;
}

MAYBE_UNUSED static int
b_pread (nbdhost_handle h, uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags)
{
  (void) h;
  (void) offset;
  (void) flags;
  memset (buf, 0, count);
  return 0;
}

#if defined(CASE_BAD_CHILDREN)
MAYBE_UNUSED static int
f_open (nbdhost_instance inst, const struct nbdhost_open_info *info, const struct nbdhost_next_ops *const *children,
        size_t n, nbdhost_handle *out)
{
  (void) info;
  (void) children;
  (void) n;
  *out = inst;
  return 0;
}

static const struct nbdhost_filter_table table = {
  NBDHOST_FILTER_TABLE_HEADER,
  .name = "bad_children",
  .version = "0",
  .description = "declares 2..1 children",
  .min_children = 2,
  .max_children = 1,
  .create = b_create,
  .open = f_open,
};
#else
MAYBE_UNUSED static const struct nbdhost_plugin_table table = {
#if defined(CASE_BAD_MAJOR)
  .abi_major = 2,
  .abi_minor = 0,
#else
  .abi_major = NBDHOST_ABI_MAJOR,
  .abi_minor = NBDHOST_ABI_MINOR,
#endif
#if defined(CASE_TINY_TABLE)
  .struct_size = 8,
#else
  .struct_size = sizeof (struct nbdhost_plugin_table),
#endif
#if defined(CASE_BAD_KIND)
  .kind = 9,
#else
  .kind = NBDHOST_PLUGIN_KIND_BACKEND,
#endif
  .name = "broken",
  .version = "0",
  .description = "must be refused",
  .create = b_create,
  .open = b_open,
  .get_size = b_get_size,
#if !defined(CASE_NO_PREAD)
  .pread = b_pread,
#endif
};
#endif

#if defined(CASE_NO_ENTRY)
/* A plausible typo: the host must not find this. */
NBDHOST_EXPORT const void *nbdhost_plugin_entry_v1 (const struct nbdhost_host_api *h);
NBDHOST_EXPORT const void *
nbdhost_plugin_entry_v1 (const struct nbdhost_host_api *h)
{
  (void) h;
  return &table;
}
#else
NBDHOST_EXPORT const void *
nbdhost_plugin_entry (const struct nbdhost_host_api *h)
{
  (void) h;
#if defined(CASE_NULL_TABLE)
  return NULL;
#else
  return &table;
#endif
}
#endif
