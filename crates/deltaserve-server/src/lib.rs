//! deltaserve-server.
