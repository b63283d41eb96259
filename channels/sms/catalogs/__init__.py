"""Message catalogs, one module per language (en, rw, fr, sw), kept within GSM-7 where the language allows."""
