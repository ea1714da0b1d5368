/* Loops on OUT to COM1's scratch register 0x3ff, served by the Python 16550 model. */
#define PORT 0x3ff
#include "out_loop.inc"
