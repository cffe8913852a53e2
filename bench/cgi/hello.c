/* The CGI peer of `make bench`: the hello of tenants/demo/hello.wat as a native CGI
 * program, which nginx runs through fcgiwrap (one fork and exec per request). */
#include <stdio.h>

int main(void) {
    fputs("Content-Type: text/plain\r\n\r\nhello from wasm\n", stdout);
    return 0;
}
