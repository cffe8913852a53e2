;; outbound_loop.wat — calls wasi_experimental_http.req in a loop until it fails.
;;
;; Why: a guest hammering `req` must be stopped by the host's bounds (requests per guest
;; request, responses held, fuel, deadline), never by its own good manners.
;;
;; Input:   stdin = url NUL mode; mode "c" closes each response, anything else keeps them
;; Output:  "calls=<calls made> last=<the failing call's code>\n"
;;
;; Memory:  0..7 iovec; 8..11 bytes written; 16..17 status; 20..23 handle; 32..63 number
;;          text; 64..127 strings; 65536..131071 stdin.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "req"
    (func $req (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "close" (func $close (param i32) (result i32)))

  (memory (export "memory") 2)
  (data (i32.const 64) "content-type: text/plain\n\ncalls=")
  (data (i32.const 100) " last=")
  (data (i32.const 108) "GET")
  (data (i32.const 112) "\n")

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
    (local $len i32) (local $url_len i32) (local $calls i32) (local $code i32)
    (local $close i32)
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (i32.const 65536))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $len (i32.load (i32.const 8)))
    (block $found
      (loop $more
        (br_if $found (i32.ge_u (local.get $url_len) (local.get $len)))
        (br_if $found (i32.eqz (i32.load8_u (i32.add (i32.const 65536) (local.get $url_len)))))
        (local.set $url_len (i32.add (local.get $url_len) (i32.const 1)))
        (br $more)))
    (local.set $close
      (i32.eq (i32.load8_u (i32.add (i32.const 65537) (local.get $url_len))) (i32.const 99)))
    (loop $again
      (local.set $calls (i32.add (local.get $calls) (i32.const 1)))
      (local.set $code
        (call $req (i32.const 65536) (local.get $url_len) (i32.const 108) (i32.const 3)
                   (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                   (i32.const 16) (i32.const 20)))
      (if (i32.eqz (local.get $code))
        (then
          (if (local.get $close) (then (drop (call $close (i32.load (i32.const 20))))))
          (br $again))))
    (call $write (i32.const 64) (i32.const 32))
    (call $num (local.get $calls))
    (call $write (i32.const 100) (i32.const 6))
    (call $num (local.get $code))
    (call $write (i32.const 112) (i32.const 1))))
