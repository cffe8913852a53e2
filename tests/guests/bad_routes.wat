;; bad_routes.wat — a `_routes` whose second line has no export name.
;;
;; Why: a module whose `_routes` prints a malformed line is refused at load,
;; with a message that names the line; the valid first line must not sneak
;; in on its own. `_start` alone would be a fine guest.
;;
;; Output of _routes:  /a _start
;;                     this-line-has-no-export
;; Output of _start:   content-type: text/plain, blank line, "from _start\n"
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 64.. the outputs.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 64) "/a _start\nthis-line-has-no-export\n")       ;; 34 bytes
  (data (i32.const 128) "content-type: text/plain\n\nfrom _start\n")  ;; 38 bytes

  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func (export "_routes")
    (call $print (i32.const 64) (i32.const 34)))

  (func (export "_start")
    (call $print (i32.const 128) (i32.const 38))))
