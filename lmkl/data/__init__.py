"""Text in, token windows out: reading corpora, tokenizing, chat rendering, windowing.

:mod:`.corpus` reads local files, ``save_to_disk`` folders and hub datasets into documents and
cuts their token streams into model-sized windows (sliding documents or llama.cpp's chunks);
:mod:`.chat` renders ``messages`` with a chat template and marks the assistant's tokens.
"""
