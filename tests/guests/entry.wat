;; entry.wat — two entrypoints, `_start` and `alt`, each with its own body.
;;
;; Why: a route's `entrypoint` picks which export runs; the body tells which
;; one did. A route naming a missing export must give 500.
;;
;; Output of _start:  content-type: text/plain, blank line, "from _start\n"
;; Output of alt:     content-type: text/plain, blank line, "from alt\n"
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 64.. the outputs.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 64) "content-type: text/plain\n\nfrom _start\n")  ;; 38 bytes
  (data (i32.const 128) "content-type: text/plain\n\nfrom alt\n")    ;; 35 bytes

  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func (export "_start")
    (call $print (i32.const 64) (i32.const 38)))

  (func (export "alt")
    (call $print (i32.const 128) (i32.const 35))))
