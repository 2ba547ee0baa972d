"""Generated lateserve.v1 stubs; see proto/python/codegen.py."""
