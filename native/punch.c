// Returns a file's space to its filesystem: fallocate(PUNCH_HOLE | KEEP_SIZE)
// on a batch of ranges, on libuv's thread pool (a punch frees extents and can
// take milliseconds). Node has no fallocate; this is the one syscall Corral
// needs that it lacks. Built by node-gyp from source at setup.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <node_api.h>

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int fd;
  size_t count;   // ranges
  double *ranges; // offset, length, offset, length, ...
  int error;      // errno of the first failure, 0 if none
} Punch;

static void execute(napi_env env, void *data) {
  (void)env;
  Punch *p = data;
  for (size_t i = 0; i < p->count; i++) {
    off_t offset = (off_t)p->ranges[2 * i];
    off_t length = (off_t)p->ranges[2 * i + 1];
    if (fallocate(p->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0) {
      p->error = errno;
      return;
    }
  }
}

static void complete(napi_env env, napi_status status, void *data) {
  Punch *p = data;
  if (status == napi_ok && p->error == 0) {
    napi_value undefined;
    napi_get_undefined(env, &undefined);
    napi_resolve_deferred(env, p->deferred, undefined);
  } else {
    int err = p->error != 0 ? p->error : EIO;
    napi_value code, message, error;
    const char *name = err == EOPNOTSUPP ? "EOPNOTSUPP" : err == EBADF ? "EBADF" : err == EIO ? "EIO" : "EPUNCH";
    napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code);
    napi_create_string_utf8(env, strerror(err), NAPI_AUTO_LENGTH, &message);
    napi_create_error(env, code, message, &error);
    napi_value errnoValue;
    napi_create_int32(env, -err, &errnoValue);
    napi_set_named_property(env, error, "errno", errnoValue);
    napi_reject_deferred(env, p->deferred, error);
  }
  napi_delete_async_work(env, p->work);
  free(p->ranges);
  free(p);
}

// punchHoles(fd: number, ranges: Float64Array): Promise<void>
static napi_value punch_holes(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd;
  napi_typedarray_type type;
  size_t length;
  void *values;
  if (argc != 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_typedarray_info(env, argv[1], &type, &length, &values, NULL, NULL) != napi_ok ||
      type != napi_float64_array || length % 2 != 0) {
    napi_throw_type_error(env, NULL, "punchHoles(fd, Float64Array of offset/length pairs)");
    return NULL;
  }
  Punch *p = calloc(1, sizeof(Punch));
  p->fd = fd;
  p->count = length / 2;
  p->ranges = malloc(length * sizeof(double) + 1);
  memcpy(p->ranges, values, length * sizeof(double));
  napi_value promise, name;
  napi_create_promise(env, &p->deferred, &promise);
  napi_create_string_utf8(env, "corral:punch", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, execute, complete, p, &p->work);
  napi_queue_async_work(env, p->work);
  return promise;
}

NAPI_MODULE_INIT() {
  napi_value fn;
  napi_create_function(env, "punchHoles", NAPI_AUTO_LENGTH, punch_holes, NULL, &fn);
  napi_set_named_property(env, exports, "punchHoles", fn);
  return exports;
}
