;; outbound_call.wat — one outbound HTTP request through wasi_experimental_http,
;; described by the request body, and everything the ABI gives back about it.
;;
;; Why: the outbound tests choose the URL, method, headers and body per test with one
;; guest, and read every error code the host returns.
;;
;; Input:   stdin = url NUL method NUL headers NUL body; an empty url makes no call
;;          (bench/outbound.py times the same guest without its call)
;; Output:  "req=<code>" and, on success, " status=<status>", "\nall=<code>" and the
;;          headers_get_all text, "\nget=<code>" and the value of x-test, "\nbody=" and
;;          the body read in 1 KiB chunks until a 0-byte read, then "\nend\n"
;;
;; Memory:  0..7 iovec; 8..11 bytes written; 16..17 status (u16); 20..23 handle;
;;          24..27 bytes written by the host; 32..63 number text; 64..159 strings;
;;          1024..5119 header buffer; 8192..9215 body chunk; 65536..131071 stdin.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "req"
    (func $req (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "close" (func $close (param i32) (result i32)))
  (import "wasi_experimental_http" "header_get"
    (func $header_get (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "headers_get_all"
    (func $headers_get_all (param i32 i32 i32 i32) (result i32)))
  (import "wasi_experimental_http" "body_read"
    (func $body_read (param i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 3)
  (data (i32.const 64) "content-type: text/plain\n\n")
  (data (i32.const 96) "req=")
  (data (i32.const 104) " status=")
  (data (i32.const 112) "\nall=")
  (data (i32.const 120) "\nget=")
  (data (i32.const 128) "\nbody=")
  (data (i32.const 140) "x-test")
  (data (i32.const 148) "\nend\n")

  (func $write (param $ptr i32) (param $len i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (br_if $done (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $done (i32.eqz (i32.load (i32.const 8))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
        (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
        (br $more))))

  ;; Write $value in decimal (digits filled from the end of 32..63).
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

  ;; Read stdin into 65536.. until end of input or the buffer is full; its length.
  (func $read_stdin (result i32)
    (local $len i32)
    (block $eof
      (loop $more
        (br_if $eof (i32.ge_u (local.get $len) (i32.const 65536)))
        (i32.store (i32.const 0) (i32.add (i32.const 65536) (local.get $len)))
        (i32.store (i32.const 4) (i32.sub (i32.const 65536) (local.get $len)))
        (br_if $eof (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $eof (i32.eqz (i32.load (i32.const 8))))
        (local.set $len (i32.add (local.get $len) (i32.load (i32.const 8))))
        (br $more)))
    (local.get $len))

  ;; The address of the first NUL in [$at, $end), or $end.
  (func $field_end (param $at i32) (param $end i32) (result i32)
    (block $found
      (loop $more
        (br_if $found (i32.ge_u (local.get $at) (local.get $end)))
        (br_if $found (i32.eqz (i32.load8_u (local.get $at))))
        (local.set $at (i32.add (local.get $at) (i32.const 1)))
        (br $more)))
    (local.get $at))

  (func (export "_start")
    (local $end i32) (local $url i32) (local $url_end i32) (local $method i32)
    (local $method_end i32) (local $headers i32) (local $headers_end i32) (local $body i32)
    (local $code i32) (local $handle i32)
    (local.set $end (i32.add (i32.const 65536) (call $read_stdin)))
    (local.set $url (i32.const 65536))
    (local.set $url_end (call $field_end (local.get $url) (local.get $end)))
    (local.set $method (i32.add (local.get $url_end) (i32.const 1)))
    (local.set $method_end (call $field_end (local.get $method) (local.get $end)))
    (local.set $headers (i32.add (local.get $method_end) (i32.const 1)))
    (local.set $headers_end (call $field_end (local.get $headers) (local.get $end)))
    (local.set $body (i32.add (local.get $headers_end) (i32.const 1)))
    (call $write (i32.const 64) (i32.const 26))
    (if (i32.eq (local.get $url) (local.get $url_end))
      (then (call $write (i32.const 148) (i32.const 5)) (return)))
    (local.set $code
      (call $req
        (local.get $url) (i32.sub (local.get $url_end) (local.get $url))
        (local.get $method) (i32.sub (local.get $method_end) (local.get $method))
        (local.get $headers) (i32.sub (local.get $headers_end) (local.get $headers))
        (local.get $body) (i32.sub (local.get $end) (local.get $body))
        (i32.const 16) (i32.const 20)))
    (call $write (i32.const 96) (i32.const 4))
    (call $num (local.get $code))
    (if (i32.eqz (local.get $code))
      (then
        (local.set $handle (i32.load (i32.const 20)))
        (call $write (i32.const 104) (i32.const 8))
        (call $num (i32.load16_u (i32.const 16)))
        (local.set $code
          (call $headers_get_all (local.get $handle) (i32.const 1024) (i32.const 4096) (i32.const 24)))
        (call $write (i32.const 112) (i32.const 5))
        (call $num (local.get $code))
        (if (i32.eqz (local.get $code))
          (then (call $write (i32.const 1024) (i32.load (i32.const 24)))))
        (local.set $code
          (call $header_get (local.get $handle) (i32.const 140) (i32.const 6)
                            (i32.const 1024) (i32.const 4096) (i32.const 24)))
        (call $write (i32.const 120) (i32.const 5))
        (call $num (local.get $code))
        (if (i32.eqz (local.get $code))
          (then (call $write (i32.const 1024) (i32.load (i32.const 24)))))
        (call $write (i32.const 128) (i32.const 6))
        (block $eof
          (loop $more
            (br_if $eof
              (call $body_read (local.get $handle) (i32.const 8192) (i32.const 1024) (i32.const 24)))
            (br_if $eof (i32.eqz (i32.load (i32.const 24))))
            (call $write (i32.const 8192) (i32.load (i32.const 24)))
            (br $more)))
        (drop (call $close (local.get $handle)))))
    (call $write (i32.const 148) (i32.const 5))))
