;; routes_many.wat — `_routes` declares 256 routes: with its own route, 257.
;;
;; Why: one over the default max_routes_per_module (256). A 1 KB module once
;; declared 500,000 routes and every worker held them (issue 10, item 4).
;;
;; Output of _routes:  "/r h\n" 256 times (1,280 bytes)
;; Output of _start, h: content-type: text/plain, blank line, "many\n"
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 64.. the outputs.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 64) "/r h\n")                                ;; 5 bytes
  (data (i32.const 128) "content-type: text/plain\n\nmany\n")   ;; 31 bytes

  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func (export "_routes")
    (local $left i32)
    (local.set $left (i32.const 256))
    (loop $again
      (call $print (i32.const 64) (i32.const 5))
      (local.set $left (i32.sub (local.get $left) (i32.const 1)))
      (br_if $again (local.get $left))))

  (func (export "_start")
    (call $print (i32.const 128) (i32.const 31)))

  (func (export "h")
    (call $print (i32.const 128) (i32.const 31))))
