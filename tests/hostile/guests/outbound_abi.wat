;; outbound_abi.wat — wasi_experimental_http calls a broken guest makes: unknown handles
;; and pointers outside its memory. WAGI's host panicked on `body_read` of an unknown
;; handle; here every call answers an error code.
;;
;; Output:  "body_read=<code>\nheader_get=<code>\nheaders_get_all=<code>\nclose=<code>\n
;;           req=<code>\n" (the req passes a URL pointer past the end of memory)
;;
;; Memory:  0..7 iovec; 8..11 bytes written; 24..27 host-written count; 32..63 number text;
;;          64..191 strings; 1024..2047 a buffer.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "req"
    (func $req (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "close" (func $close (param i32) (result i32)))
  (import "wasi_experimental_http" "header_get"
    (func $header_get (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "headers_get_all"
    (func $headers_get_all (param i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "body_read"
    (func $body_read (param i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 1)
  (data (i32.const 64) "content-type: text/plain\n\nbody_read=")
  (data (i32.const 104) "\nheader_get=")
  (data (i32.const 120) "\nheaders_get_all=")
  (data (i32.const 140) "\nclose=")
  (data (i32.const 150) "\nreq=")
  (data (i32.const 160) "\n")
  (data (i32.const 170) "GET")

  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func $num (param $value i32)
    (local $at i32)
    (local.set $at (i32.const 63))
    (loop $digit
      (i32.store8 (local.get $at)
        (i32.add (i32.const 48) (i32.rem_u (local.get $value) (i32.const 10))))
      (local.set $value (i32.div_u (local.get $value) (i32.const 10)))
      (if (local.get $value)
        (then (local.set $at (i32.sub (local.get $at) (i32.const 1))) (br $digit))))
    (call $write (local.get $at) (i32.sub (i32.const 64) (local.get $at))))

  (func (export "_start")
    (call $write (i32.const 64) (i32.const 36))
    (call $num (call $body_read (i32.const 7) (i32.const 1024) (i32.const 1024) (i32.const 24)))
    (call $write (i32.const 104) (i32.const 12))
    (call $num (call $header_get (i32.const 7) (i32.const 170) (i32.const 3)
                                 (i32.const 1024) (i32.const 1024) (i32.const 24)))
    (call $write (i32.const 120) (i32.const 17))
    (call $num (call $headers_get_all (i32.const 7) (i32.const 1024) (i32.const 1024)
                                      (i32.const 24)))
    (call $write (i32.const 140) (i32.const 7))
    (call $num (call $close (i32.const 7)))
    (call $write (i32.const 150) (i32.const 5))
    (call $num (call $req (i32.const 65500) (i32.const 100) (i32.const 170) (i32.const 3)
                          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                          (i32.const 16) (i32.const 20)))
    (call $write (i32.const 160) (i32.const 1))))
