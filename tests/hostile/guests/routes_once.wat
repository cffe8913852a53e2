;; routes_once.wat — `_routes` says on stderr that it ran, then declares /a.
;;
;; Why: `_routes` must run once per module version (sha256), whatever reloads,
;; restarts and workers follow. Its stderr reaches the server log, so a test
;; counts its runs there.
;;
;; Output of _routes:  stdout "/a alt_a\n"; stderr "routes-once-ran\n"
;; Output of _start:   content-type: text/plain, blank line, "once\n"
;; Output of alt_a:    content-type: text/plain, blank line, "once a\n"
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 64.. the outputs.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 64) "/a alt_a\n")                               ;; 9 bytes
  (data (i32.const 96) "routes-once-ran\n")                        ;; 16 bytes
  (data (i32.const 128) "content-type: text/plain\n\nonce\n")      ;; 31 bytes
  (data (i32.const 192) "content-type: text/plain\n\nonce a\n")    ;; 33 bytes

  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func (export "_routes")
    (call $write (i32.const 2) (i32.const 96) (i32.const 16))
    (call $write (i32.const 1) (i32.const 64) (i32.const 9)))

  (func (export "_start")
    (call $write (i32.const 1) (i32.const 128) (i32.const 31)))

  (func (export "alt_a")
    (call $write (i32.const 1) (i32.const 192) (i32.const 33))))
