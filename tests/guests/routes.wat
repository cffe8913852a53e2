;; routes.wat — declares its own sub-routes through `_routes`.
;;
;; Why: WAGI's dynamic routes. Loaded at route base B, `_routes` adds
;; B/a → alt_a (exact) and B/b/... → alt_b (prefix); B itself stays on _start.
;; Each export prints its own body, so a test sees which one ran.
;;
;; Output of _routes:  /a alt_a
;;                     /b/... alt_b
;; Output of _start:   content-type: text/plain, blank line, "from _start\n"
;; Output of alt_a:    content-type: text/plain, blank line, "from alt_a\n"
;; Output of alt_b:    content-type: text/plain, blank line, "from alt_b\n"
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 64.. the outputs.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 64) "/a alt_a\n/b/... alt_b\n")                   ;; 22 bytes
  (data (i32.const 128) "content-type: text/plain\n\nfrom _start\n")  ;; 38 bytes
  (data (i32.const 192) "content-type: text/plain\n\nfrom alt_a\n")   ;; 37 bytes
  (data (i32.const 256) "content-type: text/plain\n\nfrom alt_b\n")   ;; 37 bytes

  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func (export "_routes")
    (call $print (i32.const 64) (i32.const 22)))

  (func (export "_start")
    (call $print (i32.const 128) (i32.const 38)))

  (func (export "alt_a")
    (call $print (i32.const 192) (i32.const 37)))

  (func (export "alt_b")
    (call $print (i32.const 256) (i32.const 37))))
