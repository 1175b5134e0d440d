import SystemPackage
import Testing
import ExactIO

@Suite struct CrashTests {
    @Test func negativeCountIsAPreconditionFailure() async {
        await #expect(processExitsWith: .failure) {
            let p = try FileDescriptor.pipe()
            let reader = try ExactReader(p.readEnd)
            _ = try reader.readExactly(-1)
        }
        await #expect(processExitsWith: .failure) {
            let p = try FileDescriptor.pipe()
            let reader = try ExactReader(p.readEnd)
            try reader.skip(-5)
        }
        await #expect(processExitsWith: .failure) {
            _ = ByteView([1, 2, 3]).subview(2..<5)
        }
        await #expect(processExitsWith: .failure) {
            _ = ByteView([1, 2, 3])[3]
        }
    }
}
