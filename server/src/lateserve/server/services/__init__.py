"""gRPC servicers: one per lateserve.v1 service, translating proto to engine calls and back."""
