//! Generated gRPC types for `onevision.v1` live here (see build.rs).
