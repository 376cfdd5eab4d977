"""Fake upstreams for tests: real HTTP servers on 127.0.0.1 that speak a backend's wire protocol."""
