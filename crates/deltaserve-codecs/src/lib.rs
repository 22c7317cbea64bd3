//! deltaserve-codecs.
