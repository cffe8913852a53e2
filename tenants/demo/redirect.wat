;; redirect.wat — sends the client to /demo/hello.
;;
;; Why: shows the CGI rule that a `Location` header alone, with no
;; content-type and no body, makes the response a 302 redirect.
;;
;; Output:  Location: /demo/hello
;;          (blank line)
;;
;; Memory:  0..7 iovec {ptr, len}; 8..11 bytes written; 16.. the response.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param $fd i32) (param $iovs i32) (param $iovs_len i32)
                    (param $nwritten i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 16) "Location: /demo/hello\n\n")  ;; 23 bytes

  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 23))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
