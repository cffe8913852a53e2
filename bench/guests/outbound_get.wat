;; outbound_get.wat — bench/outbound.py's guest: GET the URL on stdin through
;; wasi_experimental_http and read the whole body, as httpx.Client.get does; an empty stdin
;; makes no call. Either way it answers the same fixed output, so the difference between
;; the two is the call alone.
;;
;; Input:   stdin = url (empty: no call)
;; Output:  "content-type: text/plain\n\nok\n"; a trap if a call fails
;;
;; Memory:  0..7 iovec; 8..11 bytes read or written; 16..17 status; 20..23 handle;
;;          64..95 output; 96..98 "GET"; 1024..5119 body chunk; 65536..69631 stdin.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "req"
    (func $req (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "close" (func $close (param i32) (result i32)))
  (import "wasi_experimental_http" "body_read"
    (func $body_read (param i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 2)
  (data (i32.const 64) "content-type: text/plain\n\nok\n")
  (data (i32.const 96) "GET")

  (func (export "_start")
    (local $url_len i32)
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (i32.const 4096))
    (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
      (then unreachable))
    (local.set $url_len (i32.load (i32.const 8)))
    (if (local.get $url_len)
      (then
        (if (call $req (i32.const 65536) (local.get $url_len) (i32.const 96) (i32.const 3)
                       (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                       (i32.const 16) (i32.const 20))
          (then unreachable))
        (block $eof
          (loop $more
            (if (call $body_read (i32.load (i32.const 20)) (i32.const 1024) (i32.const 4096)
                                 (i32.const 8))
              (then unreachable))
            (br_if $eof (i32.eqz (i32.load (i32.const 8))))
            (br $more)))
        (drop (call $close (i32.load (i32.const 20))))))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 29))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
