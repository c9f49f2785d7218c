/*
 * nbdhost-plugin.h: the nbdhost plugin ABI, version 1, for C (and C++)
 * plugin authors.
 *
 * This header describes exactly the same structures as the Rust module
 * `nbdhost_plugin_api::abi` (plugin-api/src/abi.rs), field for field; the
 * test plugin-api/tests/c_header.rs compiles it with gcc and checks every
 * size, offset and constant against the Rust definitions.
 *
 * A plugin is a shared object (`gcc -shared -fPIC`) that exports one
 * symbol, `nbdhost_plugin_entry`. The host calls it once, right after
 * loading, with a table of host services, and gets back the plugin's table
 * of callbacks: a `struct nbdhost_plugin_table` for a backend or a
 * `struct nbdhost_filter_table` for a filter. Name the file `NAME.so` and
 * put it in a plugin directory; a snippet then says `plugin = "NAME"`.
 *
 * Conventions
 *   - Every callback returns `int`: 0 on success or a positive errno value
 *     (EIO, ENOSPC, EINVAL, ENOTSUP, ...). Before returning an error, a
 *     callback may call `host->set_error` with a message; it reaches the
 *     client in the NBD structured error chunk and the server log.
 *   - Strings in tables are NUL-terminated UTF-8 and must stay valid while
 *     the library is loaded (use string literals). Messages passed to the
 *     host and strings in `struct nbdhost_open_info` are pointer + length,
 *     not NUL-terminated.
 *   - Capability queries (`can_*`) write their answer to `*out` and return
 *     0 (or an errno).
 *   - Nothing may unwind through a callback (no C++ exceptions, no
 *     longjmp out of it).
 *   - Libraries are never unloaded.
 *
 * Versioning (see docs/plugin-abi.md for the full rules)
 *   - Every versioned table starts with `abi_major`, `abi_minor` and
 *     `struct_size`. The reader of a table uses only the first
 *     min(its own size, struct_size) bytes; fields past that are absent
 *     (NULL / 0). NBDHOST_HAS_FIELD() and nbdhost_copy_prefix() below do
 *     this for you.
 *   - A minor version only appends fields at the end of a table, and an
 *     appended callback may always be NULL (meaning "unsupported": the host
 *     falls back). A plugin built against 1.0 loads in a 1.x host; a plugin
 *     built against 1.x loads in a 1.0 host, which ignores the extra fields.
 *   - Fields are never removed, reordered, retyped or given a new meaning
 *     within a major version. A host refuses a plugin of another major.
 */
#ifndef NBDHOST_PLUGIN_H
#define NBDHOST_PLUGIN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------ versions */

/** Major version: bumped only for incompatible changes. */
#define NBDHOST_ABI_MAJOR 1
/** Minor version: bumped when fields are appended to a table. */
#define NBDHOST_ABI_MINOR 5

/** Name of the single symbol a plugin exports. */
#define NBDHOST_ENTRY_POINT "nbdhost_plugin_entry"

/* ------------------------------------------------------------ constants */

/** `kind` of a backend's table (struct nbdhost_plugin_table). */
#define NBDHOST_PLUGIN_KIND_BACKEND 1u
/** `kind` of a filter's table (struct nbdhost_filter_table). */
#define NBDHOST_PLUGIN_KIND_FILTER 2u

/* Thread models, from most to least restrictive. The host serialises calls
 * accordingly; in a pipeline the most restrictive layer wins. */
/** One connection at a time for the whole export. */
#define NBDHOST_THREAD_MODEL_SERIALIZE_CONNECTIONS 0u
/** One request at a time across all connections of the export. */
#define NBDHOST_THREAD_MODEL_SERIALIZE_ALL_REQUESTS 1u
/** One request at a time per connection; connections run in parallel. */
#define NBDHOST_THREAD_MODEL_SERIALIZE_REQUESTS 2u
/** Any number of concurrent calls, on any handles. */
#define NBDHOST_THREAD_MODEL_PARALLEL 3u

/* Log levels for host->log. */
#define NBDHOST_LOG_ERROR 1u
#define NBDHOST_LOG_WARN 2u
#define NBDHOST_LOG_INFO 3u
/** Shown when the operator asked for this plugin's debug output
 * (`--plugin-debug NAME`); check host->debug_enabled first to save work. */
#define NBDHOST_LOG_DEBUG 4u

/* Operation flags. The host passes only flags the plugin said it handles. */
/** pwrite/trim/zero: the data must be durable on return (only passed when
 * can_fua answered NBDHOST_SUPPORT_NATIVE). */
#define NBDHOST_FLAG_FUA (1u << 0)
/** zero: the plugin may deallocate (punch a hole) instead of writing. */
#define NBDHOST_FLAG_MAY_TRIM (1u << 1)
/** zero: fail at once with ENOTSUP unless zeroing is fast. */
#define NBDHOST_FLAG_FAST_ZERO (1u << 2)
/** extents: only the first extent is needed. */
#define NBDHOST_FLAG_REQ_ONE (1u << 3)
/** pwrite_lend (ABI 1.5): the host fills this call's pieces only through
 * the kernel, so a piece that faults (a file mapping past a shrunk file's
 * end, a hole with no room to allocate) fails the write with EIO instead
 * of killing the server. Without it, lend only memory that cannot fault,
 * or decline. */
#define NBDHOST_FLAG_KERNEL_FILL (1u << 4)

/* Extent flags, for sink->add. */
/** Not allocated. */
#define NBDHOST_EXTENT_HOLE (1u << 0)
/** Reads as zeros. */
#define NBDHOST_EXTENT_ZERO (1u << 1)

/* Answers of can_fua and can_cache. */
/** Not supported. */
#define NBDHOST_SUPPORT_NONE 0u
/** Let the host emulate it (FUA with flush, cache with read). */
#define NBDHOST_SUPPORT_EMULATE 1u
/** The plugin handles the flag or operation itself. */
#define NBDHOST_SUPPORT_NATIVE 2u

/* Parameter types. The host validates and normalises values before create
 * sees them: sizes become decimal byte counts, booleans "true"/"false",
 * paths absolute. */
/** Any UTF-8 string. */
#define NBDHOST_PARAM_STRING 0u
/** Signed 64-bit decimal integer. */
#define NBDHOST_PARAM_INT 1u
/** Byte size with optional K/M/G/T/P suffix (powers of 1024). */
#define NBDHOST_PARAM_SIZE 2u
/** Boolean. */
#define NBDHOST_PARAM_BOOL 3u
/** Path, resolved relative to the snippet that names it. */
#define NBDHOST_PARAM_PATH 4u
/** List of paths, resolved like NBDHOST_PARAM_PATH, joined by '\n'. */
#define NBDHOST_PARAM_PATH_LIST 5u

/* `which` values of next->can, named after the plugin callbacks. The
 * answers are what a filter can count on from above the host's checks:
 * FUA, zeroing and cache are answered as native when the host emulates
 * them. An unknown value fails with EINVAL (treat that as "no"). */
#define NBDHOST_CAN_WRITE 1u
#define NBDHOST_CAN_FLUSH 2u
#define NBDHOST_CAN_ROTATIONAL 3u
#define NBDHOST_CAN_TRIM 4u
/** Answers 1 whenever the layer is writable: the host's checks emulate
 * zeroing below (with writes) where the layer cannot zero natively. */
#define NBDHOST_CAN_ZERO 5u
#define NBDHOST_CAN_FAST_ZERO 6u
/** Answers an NBDHOST_SUPPORT_* value. */
#define NBDHOST_CAN_FUA 7u
#define NBDHOST_CAN_MULTI_CONN 8u
#define NBDHOST_CAN_EXTENTS 9u
/** Answers an NBDHOST_SUPPORT_* value. */
#define NBDHOST_CAN_CACHE 10u

/* ------------------------------------------------------------ types */

/** Opaque per-export plugin state, returned by create. */
typedef void *nbdhost_instance;
/** Opaque per-connection plugin state, returned by open. */
typedef void *nbdhost_handle;

/**
 * Services the host offers. Each loaded plugin gets its own table, valid
 * for as long as the plugin is loaded, so keep the pointer. Fields past
 * `struct_size` are absent: test with NBDHOST_HAS_FIELD(host,
 * struct nbdhost_host_api, field) before using a field added after 1.0
 * (every field below exists since 1.0).
 */
struct nbdhost_host_api {
  /** Host's NBDHOST_ABI_MAJOR. */
  uint16_t abi_major;
  /** Host's NBDHOST_ABI_MINOR. */
  uint16_t abi_minor;
  /** sizeof(struct nbdhost_host_api) as the host compiled it. */
  uint32_t struct_size;
  /** Opaque; pass back to every host callback. */
  void *ctx;
  /** Write a log line attributed to this plugin (`msg`: `len` bytes of
   * UTF-8, no NUL needed). May be NULL. */
  void (*log) (void *ctx, uint32_t level, const char *msg, size_t len);
  /** Attach a message to the error the current callback is about to
   * return, on this thread. It reaches the client in a structured error
   * chunk. Ignored if the callback then returns 0. May be NULL. */
  void (*set_error) (void *ctx, const char *msg, size_t len);
  /** Non-zero if this plugin's debug messages are wanted. May be NULL. */
  uint32_t (*debug_enabled) (void *ctx);
  /** The message of the last failed next->... call on this thread (for
   * filters): copies up to `cap` bytes into `buf` (no NUL added) and
   * returns the full length (0: none). May be NULL. */
  size_t (*last_error) (void *ctx, char *buf, size_t cap);
  /* ---- ABI 1.4 (check struct_size: older hosts' tables end above) ---- */
  /** Non-zero while the host only checks the configuration (`nbdhost
   * --check`): create should validate its parameters and what they name,
   * and change nothing (create no file, write nothing); the instance is
   * destroyed unused. */
  uint32_t (*checking_only) (void *ctx);
};

/** One declared parameter. */
struct nbdhost_param_spec {
  /** Name as written in a config snippet. */
  const char *name;
  /** One of NBDHOST_PARAM_*. */
  uint32_t kind;
  /** Non-zero if the snippet must set it. */
  uint32_t required;
  /** Default value in snippet syntax, or NULL for none. */
  const char *default_value;
  /** One-line help text (shown by `nbdhost plugins NAME`). */
  const char *help;
};

/** A validated `key = value` pair handed to create. */
struct nbdhost_param {
  /** Parameter name, NUL-terminated. */
  const char *key;
  /** Normalised value, NUL-terminated. */
  const char *value;
};

/** Per-connection facts passed to open, valid during that call only. */
struct nbdhost_open_info {
  /** sizeof(struct nbdhost_open_info) as the host compiled it; fields
   * past it are absent. */
  uint32_t struct_size;
  /** Non-zero if the export is read-only for this connection. */
  uint32_t readonly;
  /** Export name the client chose (UTF-8, not NUL-terminated). */
  const char *export_name;
  /** Length of export_name. */
  size_t export_name_len;
  /** Peer address as text ("127.0.0.1:51234", "unix"), not NUL-terminated. */
  const char *peer;
  /** Length of peer. */
  size_t peer_len;
};

/** Block-size constraints of a handle (all zero: no constraints). */
struct nbdhost_block_size {
  /** Minimum block size: power of two, 1..65536. */
  uint32_t minimum;
  /** Preferred block size: power of two, >= max(minimum, 512). */
  uint32_t preferred;
  /** Maximum payload of one request, >= preferred. */
  uint32_t maximum;
};

/** Where extents reports what it found. Provided by the host. */
struct nbdhost_extent_sink {
  /** Opaque host state. */
  void *ctx;
  /** Append one extent (flags: NBDHOST_EXTENT_*). Extents must be
   * contiguous and ascending from the requested offset. Returns non-zero
   * (an errno) if refused: stop and return that value. Never NULL. */
  int (*add) (void *ctx, uint64_t offset, uint64_t length, uint32_t flags);
};

/** A capability query: writes the answer to *out. */
typedef int (*nbdhost_can_fn) (nbdhost_handle h, uint32_t *out);

/** One lent piece of data (ABI 1.1): len bytes at data. */
struct nbdhost_lend_piece {
  /** First byte. */
  const uint8_t *data;
  /** Number of bytes. */
  uint64_t len;
};

/** The host's receiver for lent data (ABI 1.1): n pieces. Returns 0, or an
 * errno that pread_lend must return unchanged. */
typedef int (*nbdhost_lend_sink) (void *ctx, const struct nbdhost_lend_piece *pieces, size_t n);

/** One lent piece of memory for the host to fill (ABI 1.2): len bytes at
 * data. */
struct nbdhost_lend_piece_mut {
  /** First byte. */
  uint8_t *data;
  /** Number of bytes. */
  uint64_t len;
};

/** The host's filler for lent memory (ABI 1.2): n pieces. Returns 0 once
 * every byte is written, or an errno that pwrite_lend must return
 * unchanged. */
typedef int (*nbdhost_lend_sink_mut) (void *ctx, const struct nbdhost_lend_piece_mut *pieces, size_t n);

/**
 * The table a backend's entry point returns (ABI 1.2 layout). Make it a
 * static, initialise the header with NBDHOST_BACKEND_TABLE_HEADER and set
 * the callbacks you have. create, open, get_size and pread are required;
 * every other callback may be NULL, and the host then falls back: FUA is
 * emulated with flush, zero with pwrite, cache with pread, capabilities
 * follow from which callbacks exist, and without extents every block reads
 * as allocated data.
 */
struct nbdhost_plugin_table {
  /** NBDHOST_ABI_MAJOR the plugin was built for. */
  uint16_t abi_major;
  /** NBDHOST_ABI_MINOR the plugin was built for. */
  uint16_t abi_minor;
  /** sizeof(struct nbdhost_plugin_table) as the plugin compiled it. */
  uint32_t struct_size;
  /** NBDHOST_PLUGIN_KIND_BACKEND. */
  uint32_t kind;
  /** One of NBDHOST_THREAD_MODEL_*. */
  uint32_t thread_model;
  /** Short name ("memory"); used in log lines. */
  const char *name;
  /** The plugin's own version string. */
  const char *version;
  /** One-line description. */
  const char *description;
  /** Declared parameters (may be NULL when n_params is 0). */
  const struct nbdhost_param_spec *params;
  /** Number of entries in params. */
  size_t n_params;

  /** Create the per-export state from validated parameters. Required. */
  int (*create) (const struct nbdhost_param *params, size_t n, nbdhost_instance *out);
  /** Destroy the per-export state (after every handle is closed). */
  void (*destroy) (nbdhost_instance inst);
  /** Open a per-connection handle. Required. */
  int (*open) (nbdhost_instance inst, const struct nbdhost_open_info *info, nbdhost_handle *out);
  /** Close a handle. */
  void (*close) (nbdhost_handle h);

  /** Size of the export in bytes. Required. */
  int (*get_size) (nbdhost_handle h, uint64_t *out);
  /** Block-size constraints (NULL: none). */
  int (*block_size) (nbdhost_handle h, struct nbdhost_block_size *out);
  /** Writable? (NULL: yes if pwrite exists) */
  nbdhost_can_fn can_write;
  /** Flush supported? (NULL: yes if flush exists) */
  nbdhost_can_fn can_flush;
  /** Rotational media hint (NULL: no). */
  nbdhost_can_fn is_rotational;
  /** Trim supported? (NULL: yes if trim exists) */
  nbdhost_can_fn can_trim;
  /** Native zeroing? (NULL: yes if zero exists) */
  nbdhost_can_fn can_zero;
  /** Fast zero honoured? (NULL: yes if zero exists) */
  nbdhost_can_fn can_fast_zero;
  /** FUA support, NBDHOST_SUPPORT_* (NULL: EMULATE if flush exists). */
  nbdhost_can_fn can_fua;
  /** Do all connections see one consistent state? (NULL: no) */
  nbdhost_can_fn can_multi_conn;
  /** Extents meaningful? (NULL: yes if extents exists) */
  nbdhost_can_fn can_extents;
  /** Cache support, NBDHOST_SUPPORT_* (NULL: NATIVE if cache exists). */
  nbdhost_can_fn can_cache;

  /** Read `count` bytes at `offset` into `buf`. Required. Flags: none. */
  int (*pread) (nbdhost_handle h, uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags);
  /** Write. Flags: NBDHOST_FLAG_FUA (only if can_fua said NATIVE). */
  int (*pwrite) (nbdhost_handle h, const uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags);
  /** Make every completed write durable. */
  int (*flush) (nbdhost_handle h, uint32_t flags);
  /** Discard a range. Flags: NBDHOST_FLAG_FUA. */
  int (*trim) (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags);
  /** Write zeros. Flags: FUA, MAY_TRIM, FAST_ZERO. Return ENOTSUP to make
   * the host write zeros instead (or to fail a fast-zero request). */
  int (*zero) (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags);
  /** Report allocation of [offset, offset+count) through sink. Flags:
   * NBDHOST_FLAG_REQ_ONE. */
  int (*extents) (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags,
                  struct nbdhost_extent_sink *sink);
  /** Advisory prefetch. */
  int (*cache) (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags);

  /* ---- ABI 1.1 ---- */

  /** Optional: lend [offset, offset+count) instead of copying it. Call
   * sink(ctx, pieces, n) exactly once, with pieces covering the range in
   * order that stay valid and unchanged until it returns, and return what
   * it returned; on failure return an errno without calling it (from ABI
   * 1.3 on, ENOTSUP without calling it declines: the host reads the range
   * with pread). The host still uses pread where lending does not suit it
   * (TLS, small reads). It may be called again on the same thread while
   * sink runs (a filter above lending several ranges in one reply). */
  int (*pread_lend) (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags,
                     nbdhost_lend_sink sink, void *ctx);

  /* ---- ABI 1.2 ---- */

  /** Optional: write [offset, offset+count) by lending the memory it goes
   * to. Call sink(ctx, pieces, n) exactly once, with writable pieces
   * covering the range in order, and return what it returned; the host
   * fills every byte before sink returns 0, so hold your locks until then.
   * The host only calls it with data that has already arrived (the wait
   * is a copy, never the network) and may split one client write into
   * several calls. If sink fails the pieces may hold part of the data, as
   * after a failed pwrite. On failure return an errno without calling it;
   * from ABI 1.5 on, ENOTSUP returned without calling it declines (the
   * host receives the data into its own buffer and calls pwrite; a host
   * before 1.5 fails the write instead, so only offer pwrite_lend to a
   * host whose abi_minor is 5 or more if you decline). Flags:
   * NBDHOST_FLAG_FUA (only if can_fua said NATIVE),
   * NBDHOST_FLAG_KERNEL_FILL. The host still uses pwrite where lending
   * does not suit it (small or buffered writes). */
  int (*pwrite_lend) (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags,
                      nbdhost_lend_sink_mut sink, void *ctx);
};

/**
 * The layer below a filter, as the host offers it (one per child, given to
 * the filter's open and valid until its close returns). Every call goes
 * through the host's checks for that layer, and every callback up to cache
 * is present (never NULL); pread_lend exists from ABI 1.3 on. On failure
 * the host has recorded a message (host->last_error), so returning the
 * errno unchanged passes it on.
 */
struct nbdhost_next_ops {
  /** sizeof(struct nbdhost_next_ops) as the host compiled it. */
  uint32_t struct_size;
  /** Opaque; pass back to every callback. */
  void *ctx;
  /** Size of the layer below. */
  int (*get_size) (void *ctx, uint64_t *out);
  /** Its block-size constraints (defaults filled in). */
  int (*block_size) (void *ctx, struct nbdhost_block_size *out);
  /** Capability query: `which` is an NBDHOST_CAN_* value. */
  int (*can) (void *ctx, uint32_t which, uint32_t *out);
  /** Read. */
  int (*pread) (void *ctx, uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags);
  /** Write (flags: NBDHOST_FLAG_FUA). */
  int (*pwrite) (void *ctx, const uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags);
  /** Flush. */
  int (*flush) (void *ctx, uint32_t flags);
  /** Trim (flags: NBDHOST_FLAG_FUA). */
  int (*trim) (void *ctx, uint64_t count, uint64_t offset, uint32_t flags);
  /** Zero (flags: FUA, MAY_TRIM, FAST_ZERO). */
  int (*zero) (void *ctx, uint64_t count, uint64_t offset, uint32_t flags);
  /** Extents, reported into the caller's sink (flags: REQ_ONE). */
  int (*extents) (void *ctx, uint64_t count, uint64_t offset, uint32_t flags, struct nbdhost_extent_sink *sink);
  /** Cache. */
  int (*cache) (void *ctx, uint64_t count, uint64_t offset, uint32_t flags);

  /* ---- ABI 1.3 (check struct_size: a 1.2 host's table ends above) ---- */

  /** Lend [offset, offset+count) of the layer below: the host calls
   * sink(sink_ctx, pieces, n) exactly once with pieces covering the range
   * in order, valid and unchanged while it runs, and returns what it
   * returned (or an errno without calling it: ENOTSUP if the layer below
   * declined this range, which a filter returns as its own decline). Where
   * the layer below does not lend at all, the host reads into a buffer of
   * its own and lends that. */
  int (*pread_lend) (void *ctx, uint64_t count, uint64_t offset, uint32_t flags,
                     nbdhost_lend_sink sink, void *sink_ctx);
};

/**
 * The table a filter's entry point returns (ABI 1.3 layout). The first
 * ten fields match struct nbdhost_plugin_table. create and open are
 * required; a NULL callback passes the call through unchanged to the only
 * child (a filter with several children must implement what it supports).
 */
struct nbdhost_filter_table {
  /** NBDHOST_ABI_MAJOR the filter was built for. */
  uint16_t abi_major;
  /** NBDHOST_ABI_MINOR the filter was built for. */
  uint16_t abi_minor;
  /** sizeof(struct nbdhost_filter_table) as the filter compiled it. */
  uint32_t struct_size;
  /** NBDHOST_PLUGIN_KIND_FILTER. */
  uint32_t kind;
  /** One of NBDHOST_THREAD_MODEL_* (a filter can only restrict). */
  uint32_t thread_model;
  /** Short name ("cow"). */
  const char *name;
  /** Version string. */
  const char *version;
  /** One-line description. */
  const char *description;
  /** Declared parameters. */
  const struct nbdhost_param_spec *params;
  /** Number of entries in params. */
  size_t n_params;
  /** Fewest layers below (1 for an ordinary filter). */
  uint32_t min_children;
  /** Most layers below (1 for an ordinary filter; UINT32_MAX: no limit). */
  uint32_t max_children;
  /** Non-zero: the layers below are opened read-only whatever the export
   * says. */
  uint32_t child_readonly;

  /** Create the per-export state. Required. */
  int (*create) (const struct nbdhost_param *params, size_t n, nbdhost_instance *out);
  /** Destroy it. */
  void (*destroy) (nbdhost_instance inst);
  /** Open a handle over `n` children (in snippet order; each valid until
   * close returns). Required. */
  int (*open) (nbdhost_instance inst, const struct nbdhost_open_info *info,
               const struct nbdhost_next_ops *const *children, size_t n, nbdhost_handle *out);
  /** Close a handle. */
  void (*close) (nbdhost_handle h);

  /* The rest: as in struct nbdhost_plugin_table; NULL passes through. */
  int (*get_size) (nbdhost_handle h, uint64_t *out);
  int (*block_size) (nbdhost_handle h, struct nbdhost_block_size *out);
  nbdhost_can_fn can_write;
  nbdhost_can_fn can_flush;
  nbdhost_can_fn is_rotational;
  nbdhost_can_fn can_trim;
  nbdhost_can_fn can_zero;
  nbdhost_can_fn can_fast_zero;
  nbdhost_can_fn can_fua;
  nbdhost_can_fn can_multi_conn;
  nbdhost_can_fn can_extents;
  nbdhost_can_fn can_cache;
  int (*pread) (nbdhost_handle h, uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags);
  int (*pwrite) (nbdhost_handle h, const uint8_t *buf, uint64_t count, uint64_t offset, uint32_t flags);
  int (*flush) (nbdhost_handle h, uint32_t flags);
  int (*trim) (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags);
  int (*zero) (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags);
  int (*extents) (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags,
                  struct nbdhost_extent_sink *sink);
  int (*cache) (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags);

  /* ---- ABI 1.3 ---- */

  /** Optional: as pread_lend in struct nbdhost_plugin_table, typically by
   * passing lending on to the layer below with next_ops->pread_lend
   * (shifting or narrowing the range) and adding pieces of the filter's
   * own memory where it holds the data. ENOTSUP before the sink runs
   * declines (the host then calls pread, which a filter with pread_lend
   * must provide). The host calls it only where every layer below lends
   * too; NULL: the host calls pread (or, without pread either, lends from
   * the layer below directly). */
  int (*pread_lend) (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags,
                     nbdhost_lend_sink sink, void *ctx);

  /* ---- ABI 1.5 ---- */

  /** Optional: as pwrite_lend in struct nbdhost_plugin_table, for a filter
   * that keeps written data in memory of its own (cow's overlay): lend it,
   * or decline with ENOTSUP before the sink runs (the host then calls
   * pwrite). Nothing below is involved. */
  int (*pwrite_lend) (nbdhost_handle h, uint64_t count, uint64_t offset, uint32_t flags,
                      nbdhost_lend_sink_mut sink, void *ctx);
};

/* ------------------------------------------------------------ the entry point */

#if defined(__GNUC__) || defined(__clang__)
#define NBDHOST_EXPORT __attribute__ ((visibility ("default")))
#else
#define NBDHOST_EXPORT
#endif

/**
 * The entry point every plugin defines:
 *
 *   NBDHOST_EXPORT const void *
 *   nbdhost_plugin_entry (const struct nbdhost_host_api *host)
 *   {
 *     if (host == NULL || host->abi_major != NBDHOST_ABI_MAJOR)
 *       return NULL;            // refuse a host of another major version
 *     the_host = host;          // valid while the plugin is loaded
 *     return &table;            // a static nbdhost_plugin_table or
 *   }                           // nbdhost_filter_table
 *
 * It is called once, before any other callback. Returning NULL refuses
 * the load (the host reports it). The returned table must stay valid and
 * unchanged while the plugin is loaded. Its `kind` field says which of the
 * two tables it is, which is why the return type is `const void *`.
 */
NBDHOST_EXPORT const void *nbdhost_plugin_entry (const struct nbdhost_host_api *host);

/* ------------------------------------------------------------ helpers */

/** Initialiser for the header of a backend's table:
 *   static const struct nbdhost_plugin_table table = {
 *     NBDHOST_BACKEND_TABLE_HEADER,
 *     .thread_model = NBDHOST_THREAD_MODEL_PARALLEL, .name = "x", ... }; */
#define NBDHOST_BACKEND_TABLE_HEADER                                                               \
  .abi_major = NBDHOST_ABI_MAJOR, .abi_minor = NBDHOST_ABI_MINOR,                                 \
  .struct_size = sizeof (struct nbdhost_plugin_table), .kind = NBDHOST_PLUGIN_KIND_BACKEND

/** Initialiser for the header of a filter's table. */
#define NBDHOST_FILTER_TABLE_HEADER                                                                \
  .abi_major = NBDHOST_ABI_MAJOR, .abi_minor = NBDHOST_ABI_MINOR,                                 \
  .struct_size = sizeof (struct nbdhost_filter_table), .kind = NBDHOST_PLUGIN_KIND_FILTER

/** Does the peer's table `ptr` (which has a `struct_size` field) contain
 * `field` of `type`? Use it before touching a field appended in a minor
 * version newer than the one the peer may have been built for. */
#define NBDHOST_HAS_FIELD(ptr, type, field) \
  ((size_t) (ptr)->struct_size >= offsetof (type, field) + sizeof (((type *) 0)->field))

/** Copy the part of a peer's table that both sides know into `dst`
 * (`dst_size` bytes, normally sizeof *dst) and zero the rest, so that
 * fields the peer lacks read as NULL / 0. `src_size` is the peer's
 * struct_size. */
static inline void
nbdhost_copy_prefix (void *dst, size_t dst_size, const void *src, uint32_t src_size)
{
  size_t n = (size_t) src_size < dst_size ? (size_t) src_size : dst_size;
  memset (dst, 0, dst_size);
  memcpy (dst, src, n);
}

/** Log a NUL-terminated message through the host, if it offers logging. */
static inline void
nbdhost_log (const struct nbdhost_host_api *host, uint32_t level, const char *msg)
{
  if (host && host->log)
    host->log (host->ctx, level, msg, strlen (msg));
}

/** Attach a NUL-terminated message to the error being returned. */
static inline void
nbdhost_set_error (const struct nbdhost_host_api *host, const char *msg)
{
  if (host && host->set_error)
    host->set_error (host->ctx, msg, strlen (msg));
}

/** Is this plugin's debug output wanted? */
static inline int
nbdhost_debug_enabled (const struct nbdhost_host_api *host)
{
  return host && host->debug_enabled && host->debug_enabled (host->ctx) != 0;
}

#ifdef __cplusplus
}
#endif

#endif /* NBDHOST_PLUGIN_H */
