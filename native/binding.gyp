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
    }
  ]
}
