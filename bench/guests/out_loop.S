/* Loops on OUT to the POST port 0x80 (Linux's io_delay port), which cloudkvm completes in its C run loop. */
#define PORT 0x80
#include "out_loop.inc"
