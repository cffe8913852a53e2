;; outbound_headers.wat — one outbound request, then 20,000 `header_get` calls on its response.
;;
;; Why: each host call is cheap for the guest (a few instructions) and costs the host several
;; µs of Python: the host's work must be charged to the guest's fuel and to the process's
;; share of host-call time, or a guest buys host CPU far below its price.
;;
;; Input:   stdin = url
;; Output:  "req=<code>" and, if 0, " calls=<header_get calls answered 0>\n"
;;
;; Memory:  0..7 iovec; 8..11 bytes written; 16..17 status; 20..23 handle; 24..27 value
;;          length; 32..63 number text; 64..127 strings; 1024..5119 value; 65536.. stdin.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "req"
    (func $req (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "header_get"
    (func $header_get (param i32 i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 2)
  (data (i32.const 64) "content-type: text/plain\n\nreq=")
  (data (i32.const 96) " calls=")
  (data (i32.const 104) "GET")
  (data (i32.const 108) "x-test")
  (data (i32.const 116) "\n")

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
    (local $code i32) (local $calls i32) (local $handle i32)
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (i32.const 65536))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $code
      (call $req (i32.const 65536) (i32.load (i32.const 8)) (i32.const 104) (i32.const 3)
                 (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                 (i32.const 16) (i32.const 20)))
    (call $write (i32.const 64) (i32.const 30))
    (call $num (local.get $code))
    (if (local.get $code) (then (call $write (i32.const 116) (i32.const 1)) (return)))
    (local.set $handle (i32.load (i32.const 20)))
    (loop $again
      (if (i32.eqz
            (call $header_get (local.get $handle) (i32.const 108) (i32.const 6)
                              (i32.const 1024) (i32.const 4096) (i32.const 24)))
        (then (local.set $calls (i32.add (local.get $calls) (i32.const 1)))))
      (br_if $again (i32.lt_u (local.get $calls) (i32.const 20000))))
    (call $write (i32.const 96) (i32.const 7))
    (call $num (local.get $calls))
    (call $write (i32.const 116) (i32.const 1))))
