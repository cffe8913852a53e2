;; no_content_type.wat — prints a blank line and a body, with no header at all.
;;
;; Why: a response needs one of Content-Type, Location or Status: without them the
;; host answers 500 with WAGI's message, even though the blank line is there.
;;
;; Output:  (blank line)
;;          this body has no headers
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the output.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 16) "\nthis body has no headers\n")  ;; 26 bytes

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 26))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
