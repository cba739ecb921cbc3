{
  "targets": [
    {
      "target_name": "punch",
      "sources": ["punch.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    },
    {
      "target_name": "xts",
      "sources": ["xts.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    },
    {
      "target_name": "xxh32",
      "sources": ["xxh32.c"],
      "cflags": ["-O3", "-Wall", "-Wextra"]
    }
  ]
}
