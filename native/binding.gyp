{
  "targets": [
    {
      "target_name": "punch",
      "sources": ["punch.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
