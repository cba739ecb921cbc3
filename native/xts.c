// AES-256-XTS on 4 KiB sectors for encrypted volumes, in place, with the
// plain64 tweak counted in 512-byte units (dm-crypt's, librbd's). Node's
// crypto makes one cipher per sector and so a key schedule per 4 KiB; here
// the key is set once per call and only the tweak changes per sector. Big
// buffers go to libuv's pool so that the JS thread keeps serving I/O.
// OpenSSL comes from the Node binary itself (its headers ship with Node).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <node_api.h>
#include <openssl/evp.h>

#define SECTOR 4096

static int all_zero(const uint8_t *p) {
  if (p[0] != 0 || p[7] != 0) return 0;
  for (int i = 0; i < SECTOR; i++)
    if (p[i] != 0) return 0;
  return 1;
}

// 0 on success. A sector of zeros decrypts to zeros: what holes and trims leave below.
static int xts(int encrypt, const uint8_t *key, double offset, uint8_t *data, size_t length) {
  EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
  if (!ctx) return -1;
  int ok = EVP_CipherInit_ex(ctx, EVP_aes_256_xts(), NULL, key, NULL, encrypt);
  uint8_t iv[16];
  for (size_t at = 0; ok && at < length; at += SECTOR) {
    if (!encrypt && all_zero(data + at)) continue;
    uint64_t unit = (uint64_t)(offset + (double)at) / 512;
    memset(iv, 0, sizeof iv);
    for (int b = 0; b < 8; b++) iv[b] = (uint8_t)(unit >> (8 * b));
    int out = 0;
    ok = EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, encrypt) &&
         EVP_CipherUpdate(ctx, data + at, &out, data + at, SECTOR) && out == SECTOR;
  }
  EVP_CIPHER_CTX_free(ctx);
  return ok ? 0 : -1;
}

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref keep; // the data's buffer stays alive while the pool works on it
  int encrypt;
  uint8_t key[64];
  double offset;
  uint8_t *data;
  size_t length;
  int result;
} Job;

// The arguments (encrypt, key[64], offset, data) into `job`; 0 after throwing a TypeError.
static int args(napi_env env, napi_callback_info info, Job *job, napi_value *buffer) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  bool enc;
  uint8_t *key;
  size_t key_length;
  if (argc != 4 || napi_get_value_bool(env, argv[0], &enc) != napi_ok ||
      napi_get_buffer_info(env, argv[1], (void **)&key, &key_length) != napi_ok || key_length != 64 ||
      napi_get_value_double(env, argv[2], &job->offset) != napi_ok ||
      napi_get_buffer_info(env, argv[3], (void **)&job->data, &job->length) != napi_ok ||
      job->length % SECTOR != 0 || (uint64_t)job->offset % SECTOR != 0) {
    napi_throw_type_error(env, NULL, "xts(encrypt, key[64], offset, data): whole 4 KiB sectors");
    return 0;
  }
  job->encrypt = enc;
  memcpy(job->key, key, 64);
  *buffer = argv[3];
  return 1;
}

// xtsSync(encrypt, key, offset, data): in place, on this thread.
static napi_value xts_sync(napi_env env, napi_callback_info info) {
  Job job;
  napi_value buffer;
  if (!args(env, info, &job, &buffer)) return NULL;
  if (xts(job.encrypt, job.key, job.offset, job.data, job.length) != 0)
    napi_throw_error(env, "EXTS", "AES-XTS failed");
  memset(job.key, 0, sizeof job.key);
  return NULL;
}

static void execute(napi_env env, void *p) {
  (void)env;
  Job *job = p;
  job->result = xts(job->encrypt, job->key, job->offset, job->data, job->length);
}

static void complete(napi_env env, napi_status status, void *p) {
  Job *job = p;
  if (status == napi_ok && job->result == 0) {
    napi_value undefined;
    napi_get_undefined(env, &undefined);
    napi_resolve_deferred(env, job->deferred, undefined);
  } else {
    napi_value code, message, error;
    napi_create_string_utf8(env, "EXTS", NAPI_AUTO_LENGTH, &code);
    napi_create_string_utf8(env, "AES-XTS failed", NAPI_AUTO_LENGTH, &message);
    napi_create_error(env, code, message, &error);
    napi_reject_deferred(env, job->deferred, error);
  }
  napi_delete_reference(env, job->keep);
  napi_delete_async_work(env, job->work);
  memset(job->key, 0, sizeof job->key);
  free(job);
}

// xtsAsync(encrypt, key, offset, data): Promise, in place, on libuv's pool.
static napi_value xts_async(napi_env env, napi_callback_info info) {
  Job *job = calloc(1, sizeof(Job));
  napi_value buffer;
  if (!job) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  if (!args(env, info, job, &buffer)) {
    free(job);
    return NULL;
  }
  napi_create_reference(env, buffer, 1, &job->keep);
  napi_value promise, name;
  napi_create_promise(env, &job->deferred, &promise);
  napi_create_string_utf8(env, "corral:xts", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, execute, complete, job, &job->work);
  napi_queue_async_work(env, job->work);
  return promise;
}

NAPI_MODULE_INIT() {
  napi_value fn;
  napi_create_function(env, "xtsSync", NAPI_AUTO_LENGTH, xts_sync, NULL, &fn);
  napi_set_named_property(env, exports, "xtsSync", fn);
  napi_create_function(env, "xtsAsync", NAPI_AUTO_LENGTH, xts_async, NULL, &fn);
  napi_set_named_property(env, exports, "xtsAsync", fn);
  return exports;
}
