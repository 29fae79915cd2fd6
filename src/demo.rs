//! The bundled sample region (placeholder, filled in below).
