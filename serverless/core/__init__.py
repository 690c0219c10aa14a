"""Pure core: request parsing, workflow preparation, message classification, JSON text, media
sniffing. Plain functions over plain data; no I/O library is imported here."""
